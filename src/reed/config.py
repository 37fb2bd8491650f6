"""Typed experiment configuration: dataclasses, YAML files and dotted command-line overrides.

A run is fully described by its :class:`Config`: the trainer saves the resolved config as
``<out>/config.yaml`` and inside every checkpoint, and ``reed sample`` rebuilds the model from it.

Layout: the shared sections ``seed``, ``domain``, ``targets``, ``objective``, ``train``, and one section owned by
the domain (``image:``, ``protein:``, ``molecule:``; its dataclass comes from the domain's registration in
:mod:`reed.domains`). The layout before domain sections (image ``data``/``model``/``process``/``sample``/``fit``
at the top level) still loads, with a one-line deprecation notice.

Overrides use dotted keys and YAML values, e.g. ``train.steps=200 image.model.depth=4 targets.0.coeff=0.25``.
Unknown keys and values of the wrong type raise :class:`~reed.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from reed.errors import ConfigError

log = logging.getLogger("reed")
T = TypeVar("T")

DEFAULT_DOMAIN = "image"  # the domain of a config that names none
# top-level keys of the layout before domain sections; each domain's ``upgrade`` moves them into its section
LEGACY_KEYS = ("data", "model", "process", "sample", "fit")


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
    projector: ``mlp`` (REPA's per-token MLP), ``conv`` (iREPA: one Conv2d of kernel ``projector_kernel`` over the
      square token grid; token targets only) or ``auto`` (``conv`` for ``objective.method=irepa``, else ``mlp``).
    target_norm: ``spatial`` z-scores token targets over the token axis per sample and channel, removing
      ``target_norm_gamma`` of the mean (iREPA; 0.6 its SiT-latent default); ``none``; ``auto`` (``spatial`` for
      ``irepa``, else ``none``).
    kind ``attention`` (HASTE): the teacher encoder's pre-softmax attention logits over its patch tokens at blocks
      ``attention_layers`` (1-based; HASTE: DINOv2-B's last four, 9-12), distilled into the denoiser's blocks
      ``attention_blocks`` (HASTE: 5-8) by a cross-entropy of the attention rows, over the first
      ``attention_heads`` heads (null: as many as both have; HASTE keeps 12); weight ``coeff`` (HASTE's
      lambda_a 0.5), added beside the feature terms (not averaged with them, not scaled by proj_coeff); online
      only (``source: encoder``, a Hugging Face ViT).
    entangle: REG: this pooled target is generated with the data, as one extra token of the denoiser noised with
      the data's time (velocity loss weight ``entangle_coeff``, REG's 0.03) and sampled from noise; its token's
      hidden state is aligned to it (joining a token target of the same width and depth, as REG). Images only;
      required by ``objective.method=reg``, usable with any method that keeps the target.
    projector_layers: MLP depth of the projector (3 for images as in REPA, 2 for the protein heads).
    modality: ``image`` targets are the only ones the ``repa`` preset uses.
    encoder_dtype / encoder_compile: ``source: encoder`` (online) only: the precision the frozen encoder runs in
      (``auto``: bfloat16 on CUDA, float32 on CPU; its tokens are returned as float32) and whether it is
      torch.compiled (on CUDA its input is also channels-last).
    """

    name: str = "target"
    source: str = "fitted_encoder"  # one of the domain's target_sources (checked by validate)
    path: str | None = None
    encoder: str = "minilm"
    kind: Literal["tokens", "pooled", "edges", "attention"] = "tokens"
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
    projector: Literal["auto", "mlp", "conv"] = "auto"
    projector_kernel: int = 3
    target_norm: Literal["auto", "none", "spatial"] = "auto"
    target_norm_gamma: float = 0.6
    entangle: bool = False
    entangle_coeff: float = 0.03
    attention_layers: list[int] = field(default_factory=lambda: [9, 10, 11, 12])
    attention_blocks: list[int] = field(default_factory=lambda: [5, 6, 7, 8])
    attention_heads: int | None = None
    encoder_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    encoder_compile: bool = False


@dataclass
class CurriculumConfig:
    """Weights as pure functions of the step (see :mod:`reed.curriculum`). ``align_steps`` of 0 means the whole
    run. With ``unit: epoch`` every count here is in epochs and the weights change once per epoch."""

    gen_start: int = 0
    gen_warmup: int = 0
    gen_decay: Literal["constant", "linear", "cosine"] = "constant"
    align_decay: Literal["constant", "linear", "cosine"] = "constant"
    align_steps: int = 0
    #: > 0: a hard stop, every alignment weight is 0 from this step on (HASTE's termination; any method)
    align_stop: int = 0
    unit: Literal["step", "epoch"] = "step"


@dataclass
class DispersiveConfig:
    """Dispersive loss of one block's hidden states over the local batch (encoder-free; :mod:`reed.regularizers`).
    ``coeff``: null is the method's choice (0.25 for ``disp``, off otherwise), 0 is off, > 0 adds the term to any
    method. ``depth`` null: the denoiser's last block (the PyTorch code; the paper's JAX runs use depth L/4)."""

    coeff: float | None = None
    tau: float = 1.0
    depth: int | str | None = None


@dataclass
class SelfAlignConfig:
    """SRA self-alignment to the EMA model (encoder-free; :mod:`reed.self_alignment`; images only). ``coeff``: null
    is the method's choice (0.2 for ``sra``, off otherwise). Block ``student_depth`` of the model at time t goes
    through a head and is aligned to block ``teacher_depth`` of the EMA model at t' = clamp(t - t_max u, 0, 1).
    ``loss``: ``smooth_l1`` (the paper, ``beta``), ``cos`` (per-token cosine) or ``cos_tokens`` (the reference's
    current ``cos`` option, a cosine over the token axis)."""

    coeff: float | None = None
    student_depth: int = 4
    teacher_depth: int = 8
    t_max: float = 0.2
    loss: Literal["smooth_l1", "cos", "cos_tokens"] = "smooth_l1"
    beta: float = 0.05


@dataclass
class ObjectiveConfig:
    """``method``: a preset of the one objective (:data:`reed.objective.METHOD_RULES`): ``sit`` (no alignment),
    ``repa`` (image targets averaged, constant weights), ``reed`` (targets summed with coefficients, time weights
    and the curriculum), ``reg`` (``repa`` + an entangled target generated with the data), ``irepa`` (``repa`` +
    conv projector + spatially normalised targets), ``haste`` (``repa``
    stopped at ``curriculum.align_stop``), ``sra`` (self-alignment, no target), ``disp`` (dispersive loss, no
    target). ``proj_coeff`` scales the alignment sum."""

    method: Literal["sit", "baseline", "repa", "reed", "reg", "irepa", "haste", "sra", "disp"] = "reed"
    proj_coeff: float = 0.5
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    dispersive: DispersiveConfig = field(default_factory=DispersiveConfig)
    self_align: SelfAlignConfig = field(default_factory=SelfAlignConfig)


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
    #: learning rate at step 0 of the warm-up as a fraction of ``lr``: 0 ramps (s+1)/lr_warmup (reed's default);
    #: > 0 is torch's LinearLR, ``warmup_from + (1 - warmup_from) * s / lr_warmup`` (the molecule reference: 0.01)
    warmup_from: float = 0.0
    optimizer: Literal["adamw", "adam"] = "adamw"
    amsgrad: bool = False
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
    #: data-loader worker processes preparing micro-batches ahead (reed.loader); null: on CUDA up to 4 per process
    #: (fewer on a small machine, reed.loader.default_workers), on CPU none
    workers: int | None = None
    #: steps each worker prepares ahead
    prefetch: int = 2
    #: page-locked host batches so the copy to the device overlaps compute (CUDA with workers > 0 only)
    pin_memory: bool = True
    #: "log": the device's record of the first non-finite step is read at logged steps, before every evaluation and
    #: before every checkpoint (no per-step host sync; training stops at the first of those after the non-finite
    #: step, and no checkpoint after it is written); "step": every step, at once (for debugging; one sync per step)
    finite_check: Literal["log", "step"] = "log"
    #: torch.compile the denoiser (nn.Module.compile: checkpoints keep their keys)
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    #: TF32 matmuls and convolutions on CUDA (Ampere and newer); no effect on CPU
    tf32: bool = True
    #: the fused (single-kernel) AdamW/Adam on CUDA; no effect on CPU
    fused_optimizer: bool = True
    #: recompute each block's activations in the backward pass instead of storing them (less memory, about one more
    #: forward of compute); for denoisers with ``set_activation_checkpointing`` (SiT, the protein MPNN, the molecule
    #: networks)
    activation_checkpointing: bool = False


@dataclass
class Config:
    """A whole experiment: the shared sections and, in ``sections``, the one section the domain owns.

    ``cfg.image`` / ``cfg.protein`` / ``cfg.<domain>`` read that section; :attr:`section` is the active one.
    Build a modified copy with ``dataclasses.replace`` for shared sections and :meth:`with_section` for the
    domain's.
    """

    seed: int = 0
    domain: str = DEFAULT_DOMAIN
    targets: list[TargetConfig] = field(default_factory=list)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails: cfg.<domain section>
        secs = self.__dict__.get("sections")
        if secs is not None and name in secs:
            return secs[name]
        if name.startswith("_") or secs is None:
            raise AttributeError(name)
        raise AttributeError(f"this config has no '{name}' section (domain '{self.__dict__.get('domain')}')")

    @property
    def section(self) -> Any:
        """The domain's own section (e.g. :class:`reed.image.config.ImageConfig`)."""
        return self.sections[self.domain]

    def with_section(self, **changes: Any) -> Config:
        """A copy whose domain section has ``changes`` (field=value) applied."""
        return dataclasses.replace(self, sections={**self.sections,
                                                   self.domain: dataclasses.replace(self.section, **changes)})


# --------------------------------------------------------------------------------------------------------------
# building from dicts with type checks


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error in one line: ``line L, column C: <problem>``."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


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
        if value is False and "no" in get_args(tp):
            return "no"  # YAML 1.1 reads a bare `no` as false (train.mixed_precision: no)
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


def build_from(cls: Callable[..., T], source: Any, **overrides: Any) -> T:
    """``cls(**fields of the config dataclass source that cls takes, **overrides)``: a runtime object built from its
    config section without listing the fields twice (``cls`` may be a dataclass or any keyword-only callable)."""
    import inspect

    params = inspect.signature(cls).parameters
    kwargs = {f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.name in params}
    return cls(**{**kwargs, **overrides})


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML/JSON serialisable); a :class:`Config`'s domain section sits
    at the top level under the domain's name, right after ``domain``."""
    if not isinstance(cfg, Config):
        return dataclasses.asdict(cfg)
    tree = dataclasses.asdict(cfg)
    sections = tree.pop("sections")
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out[k] = v
        if k == "domain":
            out.update(sections)
    return out


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
    """Apply ``key.sub=value`` strings (values parsed as YAML) and re-validate the whole config.

    An old-layout key the domain lists in ``legacy_overrides`` (``model.depth=4``) is applied in its section
    (``image.model.depth=4``) with a deprecation notice."""
    from reed.domains import get_domain

    cfg = validate(cfg)
    tree = to_dict(cfg)
    legacy = get_domain(cfg.domain).legacy_overrides
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"config override '{item}': value is not valid YAML ({yaml_problem(e)})") from None
        head = key.split(".", 1)[0]
        if head not in tree and head in legacy:
            log.warning("reed: deprecated override '%s': write '%s.%s' (the %s settings live in the '%s:' section)",
                        key, cfg.domain, key, head, cfg.domain)
            key = f"{cfg.domain}.{key}"
        _set_dotted(tree, key, value)
    if tree.get("domain") != cfg.domain:  # `domain=...`: the new domain's section starts from its defaults
        tree.pop(cfg.domain, None)
    return config_from_tree(tree)


def config_from_tree(tree: dict[str, Any], source: str | None = None) -> Config:
    """Build and validate a :class:`Config` from a YAML mapping. ``source`` (a file name) turns on the
    deprecation notice for the old layout; configs stored in checkpoints upgrade silently."""
    from reed.domains import domain_names, get_domain

    tree = dict(tree)
    domain = tree.get("domain", DEFAULT_DOMAIN)
    if not isinstance(domain, str):
        raise ConfigError(f"config key 'domain': expected a string, got {domain!r}")
    spec = get_domain(domain)
    legacy = [k for k in LEGACY_KEYS if k in tree]
    if legacy:
        if spec.upgrade is None:
            raise ConfigError(f"unknown config keys {legacy} at the top level")
        tree = spec.upgrade(tree)
        if source is not None:
            log.warning("reed: %s uses the old layout (top-level %s); it now belongs under '%s:' (loaded anyway)",
                        source, ", ".join(legacy), domain)
    sections = {}
    for name in domain_names():
        if name not in tree:
            continue
        value = tree.pop(name)
        if value is None:
            continue  # configs saved before domain sections hold e.g. `protein: null`
        if name != domain:
            raise ConfigError(f"config has a '{name}' section but its domain is '{domain}'")
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{name}': expected a mapping, got {value!r}")
        sections[name] = from_dict(spec.config, value, prefix=name)
    core = [f.name for f in dataclasses.fields(Config) if f.name != "sections"]
    unknown = [k for k in tree if k not in core]
    if unknown:
        valid = core + [domain]
        raise ConfigError(f"unknown config key '{unknown[0]}' (valid keys here: {', '.join(sorted(valid))})")
    cfg = from_dict(Config, tree)
    return validate(dataclasses.replace(cfg, sections=sections))


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express; fills in a missing domain section with defaults."""
    from reed.domains import get_domain

    spec = get_domain(cfg.domain)
    if cfg.domain not in cfg.sections:
        cfg = dataclasses.replace(cfg, sections={**cfg.sections, cfg.domain: spec.config()})
    other = sorted(set(cfg.sections) - {cfg.domain})
    if other:
        raise ConfigError(f"config has a '{other[0]}' section but its domain is '{cfg.domain}'")
    t = cfg.train
    for key, val in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                     ("train.log_every", t.log_every)):
        if val < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {val}")
    for key, val in (("train.lr_warmup", t.lr_warmup), ("train.checkpoint_every", t.checkpoint_every),
                     ("train.keep_checkpoints", t.keep_checkpoints), ("train.sample_every", t.sample_every),
                     ("train.num_preview", t.num_preview), ("train.weight_decay", t.weight_decay),
                     ("train.grad_clip", t.grad_clip)):
        if not val >= 0:  # also NaN
            raise ConfigError(f"config key '{key}' must be >= 0, got {val}")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ConfigError(f"config key 'train.lr' must be a positive number, got {t.lr}")
    if not 0.0 <= t.warmup_from <= 1.0:
        raise ConfigError(f"config key 'train.warmup_from' must be in [0, 1], got {t.warmup_from}")
    if t.log_with:
        from accelerate.utils import LoggerType

        known = sorted(x.value for x in LoggerType)
        bad = [x for x in t.log_with if x not in known]
        if bad:
            raise ConfigError(f"config key 'train.log_with': unknown tracker {bad[0]!r} (known: {', '.join(known)})")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must be in [0, 1), got {t.ema_decay}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"config key 'train.betas' needs two numbers in [0, 1), got {t.betas}")
    if t.epochs < 0:
        raise ConfigError(f"config key 'train.epochs' must be >= 0, got {t.epochs}")
    if t.workers is not None and t.workers < 0:
        raise ConfigError(f"config key 'train.workers' must be >= 0 (or null: 4 on CUDA, 0 on CPU), got {t.workers}")
    if t.prefetch < 1:
        raise ConfigError(f"config key 'train.prefetch' must be >= 1, got {t.prefetch}")
    names = [tg.name for tg in cfg.targets]
    if len(set(names)) != len(names):
        raise ConfigError(f"target names must be unique, got {names}")
    for i, tg in enumerate(cfg.targets):
        if tg.source not in spec.target_sources:
            raise ConfigError(f"config key 'targets.{i}.source' is '{tg.source}'; {cfg.domain} runs take targets "
                              f"from {', '.join(repr(s) for s in spec.target_sources)}")
        if len(tg.cutoffs) != 2 or tg.cutoffs[0] > tg.cutoffs[1]:
            raise ConfigError(f"config key 'targets.{i}.cutoffs' must be [low, high] with low <= high, "
                              f"got {tg.cutoffs}")
        if isinstance(tg.depth, int) and tg.depth < 1:
            raise ConfigError(f"config key 'targets.{i}.depth' must be >= 1, got {tg.depth}")
        if tg.projector_kernel < 1 or tg.projector_kernel % 2 == 0:
            raise ConfigError(f"config key 'targets.{i}.projector_kernel' must be odd and >= 1, "
                              f"got {tg.projector_kernel}")
        if not math.isfinite(tg.target_norm_gamma):
            raise ConfigError(f"config key 'targets.{i}.target_norm_gamma' must be finite, got {tg.target_norm_gamma}")
        tokens_only = [k for k, bad in (("projector", tg.projector == "conv"), ("target_norm", tg.target_norm ==
                                                                                "spatial")) if bad]
        if tokens_only and tg.kind != "tokens":
            raise ConfigError(f"config key 'targets.{i}.{tokens_only[0]}' is "
                              f"'{getattr(tg, tokens_only[0])}', which needs a token grid, but the target is kind "
                              f"'{tg.kind}'")
        if tg.kind == "attention":
            if "attention" not in spec.objective_terms:
                raise ConfigError(f"config key 'targets.{i}.kind' is 'attention', which {cfg.domain} runs do not "
                                  "support (attention-map alignment is implemented for the image SiT)")
            if tg.source != "encoder" or tg.store:
                raise ConfigError(f"config key 'targets.{i}.kind': attention maps come from a frozen encoder run on "
                                  f"every batch (source: encoder, no store), got source '{tg.source}'"
                                  + (f" with store {tg.store}" if tg.store else ""))
            if not tg.attention_layers or len(tg.attention_layers) != len(tg.attention_blocks):
                raise ConfigError(f"config keys 'targets.{i}.attention_layers' {tg.attention_layers} and "
                                  f"'attention_blocks' {tg.attention_blocks} must pair up (same, non-zero length)")
            if min(tg.attention_layers + tg.attention_blocks) < 1:
                raise ConfigError(f"config keys 'targets.{i}.attention_layers' / 'attention_blocks' are 1-based "
                                  "block indices")
        if tg.entangle and tg.kind != "pooled":
            raise ConfigError(f"config key 'targets.{i}.entangle' needs a pooled target (one vector per example), "
                              f"but the target is kind '{tg.kind}'")
        if not (math.isfinite(tg.entangle_coeff) and tg.entangle_coeff >= 0):
            raise ConfigError(f"config key 'targets.{i}.entangle_coeff' must be a number >= 0, got {tg.entangle_coeff}")
    entangled = [i for i, tg in enumerate(cfg.targets) if tg.entangle]
    if entangled and "entangle" not in spec.objective_terms:
        raise ConfigError(f"config key 'targets.{entangled[0]}.entangle': {cfg.domain} runs cannot generate a "
                          "representation token with the data (REG is implemented for the image SiT only)")
    if len(entangled) > 1:
        raise ConfigError(f"config keys 'targets.{entangled[1]}.entangle': only one target can be entangled, got "
                          f"{len(entangled)} ({', '.join(f'targets.{i}' for i in entangled)})")
    if cfg.objective.method == "reg" and not any(cfg.targets[i].modality == "image" for i in entangled):
        raise ConfigError("objective.method=reg generates a representation with the image: mark one pooled image "
                          "target with entangle: true (REG: the encoder's class token)")
    validate_objective(cfg.objective, spec)
    if spec.validate is not None:
        spec.validate(cfg)
    return cfg


def validate_objective(o: ObjectiveConfig, spec) -> None:
    """Checks of the ``objective`` section against itself and the domain ``spec`` (its ``objective_terms``)."""
    if not (math.isfinite(o.proj_coeff) and o.proj_coeff >= 0):
        raise ConfigError(f"config key 'objective.proj_coeff' must be a number >= 0, got {o.proj_coeff}")
    c = o.curriculum
    for key in ("gen_start", "gen_warmup", "align_steps", "align_stop"):
        if getattr(c, key) < 0:
            raise ConfigError(f"config key 'objective.curriculum.{key}' must be >= 0, got {getattr(c, key)}")
    if o.method == "haste" and c.align_stop <= 0:
        raise ConfigError("objective.method=haste stops the alignment at a fixed step: set "
                          "objective.curriculum.align_stop > 0 (HASTE: 250000 for SiT-XL/2 on ImageNet)")
    d, sa = o.dispersive, o.self_align
    if d.coeff is not None and not (math.isfinite(d.coeff) and d.coeff >= 0):
        raise ConfigError(f"config key 'objective.dispersive.coeff' must be a number >= 0, got {d.coeff}")
    if not (math.isfinite(d.tau) and d.tau > 0):
        raise ConfigError(f"config key 'objective.dispersive.tau' must be > 0, got {d.tau}")
    if isinstance(d.depth, int) and d.depth < 1:
        raise ConfigError(f"config key 'objective.dispersive.depth' must be >= 1, got {d.depth}")
    if sa.coeff is not None and not (math.isfinite(sa.coeff) and sa.coeff >= 0):
        raise ConfigError(f"config key 'objective.self_align.coeff' must be a number >= 0, got {sa.coeff}")
    if not 1 <= sa.student_depth < sa.teacher_depth:
        raise ConfigError(f"config keys 'objective.self_align.student_depth' ({sa.student_depth}) and "
                          f"'teacher_depth' ({sa.teacher_depth}) need 1 <= student < teacher")
    if not 0.0 <= sa.t_max <= 1.0:
        raise ConfigError(f"config key 'objective.self_align.t_max' must be in [0, 1], got {sa.t_max}")
    if not sa.beta > 0:
        raise ConfigError(f"config key 'objective.self_align.beta' must be > 0, got {sa.beta}")
    from reed.objective import method_rule

    rule = method_rule(o.method)
    uses = {"dispersive": d.coeff if d.coeff is not None else rule.dispersive,
            "self_align": sa.coeff if sa.coeff is not None else rule.self_align}
    for term, coeff in uses.items():
        if coeff and term not in spec.objective_terms:
            why = spec.objective_terms_note or "the domain does not support it"
            raise ConfigError(f"objective.{term} (method {o.method}) is not available for {spec.name} runs: {why}")


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
            raise ConfigError(f"config file {p} is not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    cfg = config_from_tree(tree, source=str(path) if path is not None else None)
    return apply_overrides(cfg, overrides or []) if overrides else cfg


def dump_config(cfg: Config) -> str:
    """YAML text of the resolved config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_yaml_text(text: str, source: str = "<checkpoint>") -> Config:
    """Parse a config saved by :func:`dump_config` (e.g. the copy inside a checkpoint)."""
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config stored in {source} is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config stored in {source} must hold a mapping at the top level")
    return config_from_tree(tree)
