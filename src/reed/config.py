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
    projector_layers: MLP depth of the projector (3 for images as in REPA, 2 for the protein heads).
    modality: ``image`` targets are the only ones the ``repa`` preset uses.
    """

    name: str = "target"
    source: str = "fitted_encoder"  # one of the domain's target_sources (checked by validate)
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
    if spec.validate is not None:
        spec.validate(cfg)
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
