"""The molecule domain's config section (``molecule:``): molecules, equivariant nets, flow, sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from reed.errors import ConfigError

TARGET_SOURCES = ("molecule_encoder",)
# how the stability metrics count an aromatic bond (reed.molecule.metrics.atom_stability); here so that the
# `reed evaluate --aromatic` flag loads without RDKit
AROMATIC_RULES: tuple[str, ...] = ("intended", "reference")


@dataclass
class MoleculeDataConfig:
    """Molecules. ``format``: ``edm_npz`` (QM9/GEOM in the EDM layout; bonds inferred with RDKit), ``sdf`` or
    ``smiles`` (one SMILES per line; an ETKDG conformer each). ``split`` has 2 or 3 fractions (train, valid[, test]),
    a random split by record. ``coord_std`` (Å) scales coordinates to the model's units (QM9 1.7233, GEOM-Drugs
    2.4070).

    ``conformers`` (GEOM ``.npy``): ``all`` makes every conformer a record (EDM's protocol: the split is by
    conformer), ``first`` keeps each molecule's first (lowest-energy) conformer, the reference's protocol, so the
    split is by molecule. ``kekulize`` (``edm_npz``): inferred bonds in kekulé form (no aromatic class), or, with
    false, RDKit's aromatic bonds as class 4 as the reference's data hold them (formal charges are RDKit's in both).
    ``reshuffle``: the atom-budget batches are rebuilt every epoch with molecules of equal size shuffled between
    them (the reference reshuffles its buckets every epoch); false keeps one fixed set of batches, only their order
    changing per epoch."""

    format: Literal["edm_npz", "sdf", "smiles"] = "edm_npz"
    path: str | None = None
    limit: int | None = None
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    atom_budget: int = 4096
    coord_std: float = 1.723299503326416
    rotate: bool = True
    conformers: Literal["all", "first"] = "all"
    kekulize: bool = True
    reshuffle: bool = True


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
    ``eval_num`` molecules from the EMA model and logs stability/validity; 0 = only at the end.

    ``type_vocab``: the model's atom-type classes, ``data`` (the data's elements, e.g. 5 for QM9) or ``reference``
    (the reference's 18 tokens: PAD, MASK and 16 elements, all in the uniform prior and the CTMC's K, which changes
    its jump rates). ``elements`` (those classes, resolved) is filled in when left empty.
    ``curriculum_every``: with ``objective.curriculum.unit: epoch`` the counts stay in epochs, but the weights change
    every ``step`` (the reference's per-step generative warm-up) or once per ``epoch``.
    ``aromatic_rule``: how the stability metrics count an aromatic bond, ``intended`` (1.5, floored) or
    ``reference`` (1, what the reference's code computes; the paper's numbers), see
    :data:`reed.molecule.metrics.AROMATIC_RULES`. Used by the in-training evaluation and by ``reed evaluate --run``
    unless ``--aromatic`` is given."""

    data: MoleculeDataConfig = field(default_factory=MoleculeDataConfig)
    model: MoleculeModelConfig = field(default_factory=MoleculeModelConfig)
    process: MoleculeProcessConfig = field(default_factory=MoleculeProcessConfig)
    sample: MoleculeSampleConfig = field(default_factory=MoleculeSampleConfig)
    fit: MoleculeFitConfig = field(default_factory=MoleculeFitConfig)
    eval_every: int = 0
    eval_num: int = 200
    type_vocab: Literal["data", "reference"] = "data"
    curriculum_every: Literal["step", "epoch"] = "step"
    aromatic_rule: Literal["intended", "reference"] = "intended"
    elements: list[str] | None = None


def validate_molecule(cfg) -> None:
    """Cross-field checks of the ``molecule:`` section."""
    md = cfg.molecule.data
    if md.atom_budget < 1 or md.coord_std <= 0 or len(md.split) not in (2, 3):
        raise ConfigError("config keys 'molecule.data.atom_budget' (>= 1), 'molecule.data.coord_std' (> 0) and "
                          "'molecule.data.split' (2 or 3 fractions) are invalid")
    if cfg.molecule.eval_num < 1:
        raise ConfigError(f"config key 'molecule.eval_num' must be >= 1 (molecules sampled to evaluate), got "
                          f"{cfg.molecule.eval_num}")
