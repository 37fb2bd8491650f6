"""The molecule domain's config section (``molecule:``): molecules, equivariant nets, flow, sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from reed.errors import ConfigError

TARGET_SOURCES = ("molecule_encoder",)


@dataclass
class MoleculeDataConfig:
    """Molecules. ``format``: ``edm_npz`` (QM9/GEOM in the EDM layout; bonds inferred with RDKit), ``sdf`` or
    ``smiles`` (one SMILES per line; an ETKDG conformer each). ``split`` has 2 or 3 fractions (train, valid[, test]).
    ``coord_std`` (Å) scales coordinates to the model's units (QM9 1.7233, GEOM-Drugs 2.4070)."""

    format: Literal["edm_npz", "sdf", "smiles"] = "edm_npz"
    path: str | None = None
    limit: int | None = None
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    atom_budget: int = 4096
    coord_std: float = 1.723299503326416
    rotate: bool = True


@dataclass
class MoleculeModelConfig:
    """Equivariant denoiser (:mod:`reed.molecule.nets`); explicit fields override the preset."""

    preset: Literal["semla", "semla-small", "egnn", "egnn-small"] = "semla"
    hidden: int | None = None
    layers: int | None = None


@dataclass
class MoleculeProcessConfig:
    """Equivariant flow matching (:mod:`reed.molecule.flow`)."""

    coord_noise: float = 0.2
    ot: Literal["equivariant", "none"] = "equivariant"
    time_alpha: float = 2.0
    time_beta: float = 1.0
    w_coords: float = 1.0
    w_types: float = 0.2
    w_bonds: float = 1.0
    w_charges: float = 1.0
    coord_loss_norm: Literal["atoms", "padded"] = "atoms"
    self_condition: float = 0.5


@dataclass
class MoleculeSampleConfig:
    """Sampling (:func:`reed.molecule.sampling.sample_molecules`)."""

    steps: int = 100
    grid: Literal["log", "linear"] = "log"
    eta: float = 1.0
    batch_size: int = 256


@dataclass
class MoleculeFitConfig:
    """``reed fit-encoder`` for molecules: an equivariant encoder pretrained by coordinate denoising."""

    width: int = 64
    steps: int = 300
    lr: float = 1e-3


@dataclass
class MoleculeConfig:
    """Everything specific to 3D molecule generation (``domain: molecule``). ``eval_every`` (steps) samples
    ``eval_num`` molecules from the EMA model and logs stability/validity; 0 = only at the end. ``elements`` (the
    atom-type vocabulary) is filled from the data when left empty."""

    data: MoleculeDataConfig = field(default_factory=MoleculeDataConfig)
    model: MoleculeModelConfig = field(default_factory=MoleculeModelConfig)
    process: MoleculeProcessConfig = field(default_factory=MoleculeProcessConfig)
    sample: MoleculeSampleConfig = field(default_factory=MoleculeSampleConfig)
    fit: MoleculeFitConfig = field(default_factory=MoleculeFitConfig)
    eval_every: int = 0
    eval_num: int = 200
    elements: list[str] | None = None


def validate_molecule(cfg) -> None:
    """Cross-field checks of the ``molecule:`` section."""
    md = cfg.molecule.data
    if md.atom_budget < 1 or md.coord_std <= 0 or len(md.split) not in (2, 3):
        raise ConfigError("config keys 'molecule.data.atom_budget' (>= 1), 'molecule.data.coord_std' (> 0) and "
                          "'molecule.data.split' (2 or 3 fractions) are invalid")
