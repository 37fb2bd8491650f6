"""Typed experiment configuration: dataclasses, YAML files and dotted command-line overrides.

A run is fully described by its :class:`Config`: the trainer saves the resolved config as
``<out>/config.yaml`` and inside every checkpoint, and ``reed sample`` rebuilds the model from it.

Overrides use dotted keys and YAML values, e.g. ``train.steps=200 model.depth=4 targets.0.coeff=0.25``.
Unknown keys and values of the wrong type raise :class:`~reed.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from reed.errors import ConfigError

TIME_WEIGHTS = ("constant", "linear", "cosine", "sigmoid", "loglinear", "cutoff")


@dataclass
class DataConfig:
    """Where the training examples come from.

    ``name='digits'``: the embedded default, ``sklearn.datasets.load_digits`` (1797 real 8x8 digits, 10 classes).
    ``name='npz'``: a user file with ``images`` (N,H,W[,C]) uint8 or (N,C,H,W) float in [-1,1] and ``labels`` (N,).
    ``name='images'``: a directory written by ``reed prepare images`` (uint8 shards), trained in pixel space.
    ``name='latents'``: a directory written by ``reed prepare latents`` (VAE posterior mean/std, resampled each step).
    """

    name: Literal["digits", "npz", "images", "latents"] = "digits"
    path: str | None = None


@dataclass
class ModelConfig:
    """SiT denoiser. ``preset`` names a size (``SiT-XL/2`` ... ``SiT-T/2``); explicit fields override it.

    ``input_size``, ``in_channels`` and ``num_classes`` are filled from the data when left ``None``.
    """

    preset: str = "SiT-T/2"
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    fused_attn: bool = True
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None


@dataclass
class ProcessConfig:
    """Continuous flow process (t=0 data, t=1 noise)."""

    path: Literal["linear", "cosine"] = "linear"
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    label_dropout: float = 0.1


@dataclass
class TargetConfig:
    """One alignment target: where z comes from and how the denoiser is aligned to it.

    source:
      * ``fitted_encoder`` — an encoder fitted on this data set by ``reed fit-encoder`` (directory ``path``).
      * ``caption_text`` — a caption per example, embedded by the sentence encoder ``encoder`` (``minilm`` or a path).
      * ``file`` — a precomputed array (``.npy``/``.npz``/``.safetensors``) of shape (N,T,D) or (N,D) at ``path``.
      * ``store`` — a target store directory written by ``reed embed`` (sharded, memory-mapped) at ``path``.
      * ``encoder`` — a frozen pretrained image encoder named ``encoder`` (e.g. ``dinov2-vit-b``; weights from
        ``path`` or the HF cache), run on every batch (slow: prefer ``reed embed`` + ``source: store``).
      * ``vlm`` — (image, caption) through the VLM ``encoder`` (a transformers image-text-to-text model), mean of
        hidden layer ``layer`` over real tokens; captions from ``captions`` (a ``reed caption`` directory).
        Only through ``reed embed`` into a store.
      * ``protein_store`` — proteins: array ``array`` (default: ``name``; e.g. ``single``/``pair``/``structure``)
        of a protein target store at ``path`` (written by ``reed embed-protein``), looked up by example name with
        a sequence-equality check.
      * ``molecule_encoder`` — molecules: a per-molecule representation from ``encoder: fitted`` (an equivariant
        encoder fitted on the data by ``reed fit-encoder``, directory ``path``) or ``encoder: unimol`` (UniMol via
        unimol_tools, weights directory ``path``); computed once for the training set and cached.
    captions: a ``reed caption`` output directory (for ``caption_text``/``vlm`` on data without built-in captions).
    store: where ``reed embed`` writes this target (a target store directory); when set, training reads the
      target from that store instead of computing it, so one config serves both steps.
    kind: ``tokens`` aligns every token (B,T,D); ``pooled`` aligns the token mean (B,D); ``edges`` aligns pair
      features on the model's kNN graph with dense pair targets (B,L,L,D) gathered on it (proteins).
    depth: tap depth in the denoiser (1 = output of the first block), or a named tap (proteins: ``encoder``,
      ``decoder.<d>.nodes``, ``decoder.<d>.edges``).
    standardize: per-channel standardisation of the targets with batch statistics over valid positions.
    projector_layers: MLP depth of the projector (3 for images as in REPA, 2 for the protein heads).
    modality: ``image`` targets are the only ones the ``repa`` preset uses.
    """

    name: str = "target"
    source: Literal["fitted_encoder", "caption_text", "file", "store", "encoder", "vlm",
                    "protein_store", "molecule_encoder"] = "fitted_encoder"
    path: str | None = None
    encoder: str = "minilm"
    kind: Literal["tokens", "pooled", "edges"] = "tokens"
    modality: Literal["image", "text", "structure", "sequence", "other"] = "image"
    depth: int | str = 2
    coeff: float = 1.0
    time_weight: Literal["constant", "linear", "cosine", "sigmoid", "loglinear", "cutoff"] = "constant"
    cutoffs: list[float] = field(default_factory=lambda: [0.0, 1.0])
    projector_dim: int = 2048
    dim: int | None = None
    captions: str | None = None
    layer: int = 15
    store: str | None = None
    array: str | None = None
    standardize: bool = False
    projector_layers: int = 3


@dataclass
class CurriculumConfig:
    """Weights as pure functions of the step (see :mod:`reed.curriculum`). ``align_steps`` of 0 means the whole
    run. With ``unit: epoch`` every count here is in epochs and the weights change once per epoch."""

    gen_start: int = 0
    gen_warmup: int = 0
    gen_decay: Literal["constant", "linear", "cosine"] = "constant"
    align_decay: Literal["constant", "linear", "cosine"] = "constant"
    align_steps: int = 0
    unit: Literal["step", "epoch"] = "step"


@dataclass
class ObjectiveConfig:
    """``method``: ``sit`` (no alignment), ``repa`` (image targets averaged, constant weights) or ``reed``
    (targets summed with coefficients, time weights and the curriculum). ``proj_coeff`` scales the alignment sum."""

    method: Literal["sit", "baseline", "repa", "reed"] = "reed"
    proj_coeff: float = 0.5
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


@dataclass
class SampleConfig:
    """Sampler used for in-training previews and ``reed sample`` defaults."""

    sampler: Literal["euler", "heun", "sde"] = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    use_ema: bool = True


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpoint cadence.

    ``epochs`` > 0 sets ``steps`` to epochs x steps per epoch (token-budget batches, e.g. proteins); then
    ``batch_size`` is unused and the batch is ``protein.data.token_budget`` residues.
    """

    steps: int = 1000
    epochs: int = 0
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-4
    lr_warmup: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema_decay: float = 0.9999
    log_every: int = 10
    sample_every: int = 0
    num_preview: int = 40
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_with: list[str] = field(default_factory=list)
    cache_dir: str = ".cache/reed"
    progress: bool = True


@dataclass
class FitConfig:
    """``reed fit-encoder``: a small CNN fitted with VICReg on the training images (for ``fitted_encoder`` targets)."""

    dim: int = 64
    width: int = 64
    downsample: int = 1
    steps: int = 300
    batch_size: int = 256
    lr: float = 1e-3


@dataclass
class ProteinDataConfig:
    """Protein structures. ``format``: ``directory`` (PDB/mmCIF files, split with the fractions ``split``) or
    ``pdb_2021aug02`` (ProteinMPNN's training set layout with its cluster splits).
    ``split_by: sequence`` keeps identical chains (homo-oligomers) in one part so validation/test sequences are
    never trained on; ``example`` splits chains independently."""

    format: Literal["directory", "pdb_2021aug02"] = "directory"
    path: str | None = None
    mode: Literal["chain", "complex"] = "chain"
    max_length: int = 256
    max_resolution: float = 3.5
    member: Literal["first", "random"] = "first"
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    split_by: Literal["example", "sequence"] = "sequence"
    token_budget: int = 20000


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
class MoleculeConfig:
    """Everything specific to 3D molecule generation (``domain: molecule``). ``eval_every`` (steps) samples
    ``eval_num`` molecules from the EMA model and logs stability/validity; 0 = only at the end. ``elements`` (the
    atom-type vocabulary) is filled from the data when left empty."""

    data: MoleculeDataConfig = field(default_factory=MoleculeDataConfig)
    model: MoleculeModelConfig = field(default_factory=MoleculeModelConfig)
    process: MoleculeProcessConfig = field(default_factory=MoleculeProcessConfig)
    sample: MoleculeSampleConfig = field(default_factory=MoleculeSampleConfig)
    eval_every: int = 0
    eval_num: int = 200
    elements: list[str] | None = None


@dataclass
class Config:
    """A whole experiment. ``domain`` picks the data/model/process: ``image`` uses ``data``/``model``/``process``,
    ``protein`` the ``protein`` section, ``molecule`` the ``molecule`` section."""

    seed: int = 0
    domain: Literal["image", "protein", "molecule"] = "image"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    targets: list[TargetConfig] = field(default_factory=list)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    protein: ProteinConfig | None = None
    molecule: MoleculeConfig | None = None


# --------------------------------------------------------------------------------------------------------------
# building from dicts with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (valid keys here: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config override '{dotted}': '{where}' is not a valid list index")
            node = node[int(part)]
        else:
            if part not in node:
                raise ConfigError(f"unknown config key '{where}' in override '{dotted}'")
            node = node[part]
        if node is None:
            raise ConfigError(f"config override '{dotted}': '{where}' is null and has no sub-keys")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"config override '{dotted}': '{last}' is not a valid list index")
        node[int(last)] = value
    elif isinstance(node, dict):
        if last not in node:
            raise ConfigError(f"unknown config key '{dotted}'")
        node[last] = value
    else:
        raise ConfigError(f"config override '{dotted}': cannot set a key inside a {type(node).__name__}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key.sub=value`` strings (values parsed as YAML) and re-validate the whole config."""
    tree = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"config override '{item}': value is not valid YAML ({e})") from None
        _set_dotted(tree, key.strip(), value)
    return validate(from_dict(Config, tree))


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express."""
    t = cfg.train
    for key, val in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum)):
        if val < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {val}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must be in [0, 1), got {t.ema_decay}")
    if len(t.betas) != 2:
        raise ConfigError(f"config key 'train.betas' needs two numbers, got {t.betas}")
    if not 0.0 <= cfg.process.label_dropout < 1.0:
        raise ConfigError(f"config key 'process.label_dropout' must be in [0, 1), got {cfg.process.label_dropout}")
    names = [tg.name for tg in cfg.targets]
    if len(set(names)) != len(names):
        raise ConfigError(f"target names must be unique, got {names}")
    for i, tg in enumerate(cfg.targets):
        if len(tg.cutoffs) != 2 or tg.cutoffs[0] > tg.cutoffs[1]:
            raise ConfigError(f"config key 'targets.{i}.cutoffs' must be [low, high] with low <= high, "
                              f"got {tg.cutoffs}")
        if isinstance(tg.depth, int) and tg.depth < 1:
            raise ConfigError(f"config key 'targets.{i}.depth' must be >= 1, got {tg.depth}")
        if tg.source in ("fitted_encoder", "file", "store", "protein_store") and not tg.path:
            raise ConfigError(f"config key 'targets.{i}.path' is required for source '{tg.source}'")
    if cfg.domain == "protein":
        if cfg.protein is None:
            cfg = dataclasses.replace(cfg, protein=ProteinConfig())
        pd = cfg.protein.data
        if pd.token_budget < 1 or pd.max_length < 1:
            raise ConfigError("config keys 'protein.data.token_budget' and 'protein.data.max_length' must be >= 1")
        for i, tg in enumerate(cfg.targets):
            if tg.source != "protein_store":
                raise ConfigError(f"config key 'targets.{i}.source' is '{tg.source}'; protein runs take targets "
                                  "from 'protein_store' (written by reed embed-protein)")
    if cfg.domain == "molecule":
        if cfg.molecule is None:
            cfg = dataclasses.replace(cfg, molecule=MoleculeConfig())
        md = cfg.molecule.data
        if md.atom_budget < 1 or md.coord_std <= 0 or len(md.split) not in (2, 3):
            raise ConfigError("config keys 'molecule.data.atom_budget' (>= 1), 'molecule.data.coord_std' (> 0) and "
                              "'molecule.data.split' (2 or 3 fractions) are invalid")
        for i, tg in enumerate(cfg.targets):
            if tg.source != "molecule_encoder":
                raise ConfigError(f"config key 'targets.{i}.source' is '{tg.source}'; molecule runs take targets from "
                                  "'molecule_encoder'")
    if t.epochs < 0:
        raise ConfigError(f"config key 'train.epochs' must be >= 0, got {t.epochs}")
    s = cfg.sample
    if not 0.0 <= s.guidance_low <= s.guidance_high <= 1.0:
        raise ConfigError(f"sample.guidance_low/high must satisfy 0 <= low <= high <= 1, got {s.guidance_low}, "
                          f"{s.guidance_high}")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    cfg = validate(from_dict(Config, tree))
    return apply_overrides(cfg, overrides or []) if overrides else cfg


def dump_config(cfg: Config) -> str:
    """YAML text of the resolved config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_yaml_text(text: str, source: str = "<checkpoint>") -> Config:
    """Parse a config saved by :func:`dump_config` (e.g. the copy inside a checkpoint)."""
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config stored in {source} is not valid YAML: {e}") from None
    return validate(from_dict(Config, tree))
