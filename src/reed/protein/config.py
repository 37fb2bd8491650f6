"""The protein domain's config section (``protein:``): structures, MPNN denoiser, masked process, design."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reed.errors import ConfigError

TARGET_SOURCES = ("protein_store",)


@dataclass
class ProteinDataConfig:
    """Protein structures. ``format``: ``directory`` (PDB/mmCIF files, split with the fractions ``split``) or
    ``pdb_2021aug02`` (ProteinMPNN's training set layout with its cluster splits).
    ``split_by: sequence`` keeps identical chains (homo-oligomers) in one part so validation/test sequences are
    never trained on; ``example`` splits chains independently.

    ``pdb_2021aug02`` only: ``chain_list`` is the index CSV (CHAINID, DEPOSITION, RESOLUTION, HASH, CLUSTER,
    SEQUENCE; default ``list.csv``, e.g. REED's ``list_filtered.csv``) and ``cluster_list`` optionally keeps only
    the clusters it names (a text file of ids one per line, or REED's ``cluster_seq_dict_removeX.pkl``, whose
    keys are the clusters with AlphaFold3 embeddings). Relative names are taken inside ``path``, where the
    reference keeps both files."""

    format: Literal["directory", "pdb_2021aug02"] = "directory"
    path: str | None = None
    mode: Literal["chain", "complex"] = "chain"
    max_length: int = 256
    max_resolution: float = 3.5
    member: Literal["first", "random"] = "first"
    chain_list: str | None = None
    cluster_list: str | None = None
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    split_by: Literal["example", "sequence"] = "sequence"
    token_budget: int = 20000

    def index_file(self) -> Path:
        """The pdb_2021aug02 index CSV: ``chain_list`` (inside ``path`` unless absolute), default ``list.csv``."""
        return Path(self.path or ".") / (self.chain_list or "list.csv")

    def cluster_file(self) -> Path | None:
        """The optional cluster list (inside ``path`` unless absolute), or None."""
        return None if not self.cluster_list else Path(self.path or ".") / self.cluster_list


@dataclass
class MPNNConfig:
    """ProteinMPNN-style denoiser (spec protein.md section 1); explicit fields override the preset."""

    preset: Literal["mpnn", "mpnn-small"] = "mpnn"
    hidden: int | None = None
    encoder_layers: int | None = None
    decoder_layers: int | None = None
    k_neighbors: int | None = None
    dropout: float = 0.1
    backbone_noise: float = 0.1
    learnable_node: bool = False
    update_edge: bool = False


@dataclass
class MaskedProcessConfig:
    """Masking diffusion (see :mod:`reed.processes.masked`)."""

    parameterization: Literal["reference", "mdlm"] = "reference"
    label_smoothing: float = 0.1
    min_t: float = 0.01
    loss_norm: float = 2000.0


@dataclass
class MaskedSampleConfig:
    """Sequence design (see :mod:`reed.sampling.masked`)."""

    steps: int = 500
    temperature: float = 0.1
    order: Literal["random", "confidence"] = "random"


@dataclass
class ProteinConfig:
    """Everything specific to protein inverse folding (``domain: protein``). ``eval_every`` (epochs) runs
    sequence design on the validation split and logs recovery; 0 = only at the end."""

    data: ProteinDataConfig = field(default_factory=ProteinDataConfig)
    model: MPNNConfig = field(default_factory=MPNNConfig)
    process: MaskedProcessConfig = field(default_factory=MaskedProcessConfig)
    sample: MaskedSampleConfig = field(default_factory=MaskedSampleConfig)
    eval_every: int = 10
    eval_max_proteins: int = 200


def validate_protein(cfg) -> None:
    """Cross-field checks of the ``protein:`` section and its targets."""
    pd = cfg.protein.data
    if pd.token_budget < 1 or pd.max_length < 1:
        raise ConfigError("config keys 'protein.data.token_budget' and 'protein.data.max_length' must be >= 1")
    if pd.format != "pdb_2021aug02":
        for key in ("chain_list", "cluster_list"):
            if getattr(pd, key):
                raise ConfigError(f"config key 'protein.data.{key}' is for format 'pdb_2021aug02' (ProteinMPNN's "
                                  f"training set layout), but 'protein.data.format' is '{pd.format}'")
    for i, tg in enumerate(cfg.targets):
        if not tg.path:
            raise ConfigError(f"config key 'targets.{i}.path' is required for source '{tg.source}'")
