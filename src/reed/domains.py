"""Domains as the trainer sees them: the :class:`Domain` protocol, a registry by name, and the set-up every
domain shares.

A domain is one package (``reed.image``, ``reed.protein``, ``reed.molecule``, or your own) whose module
defines ``DOMAIN = DomainSpec(...)``: the config section it owns, a factory for the per-run :class:`Domain`
object the trainer talks to, the denoiser of a resolved config (for sampling from checkpoints) and its CLI
commands. The core (:mod:`reed.train`, :mod:`reed.objective`, ...) never imports a domain: it asks this
registry for ``cfg.domain`` and then only calls the hooks of the protocol.

Adding a domain::

    # mypkg/chem/__init__.py
    DOMAIN = DomainSpec(name="chem", config=ChemConfig, task=ChemTask, denoiser=build_chem_denoiser,
                        target_sources=("chem_encoder",))
    # before loading a config with ``domain: chem``
    reed.domains.register_domain("chem", "mypkg.chem")    # or DOMAIN itself
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from reed.errors import ConfigError, ReedError

if TYPE_CHECKING:
    from reed.config import Config, TargetConfig
    from reed.objective import AlignTerm, Curriculum, Objective, ReedModule


class MissingExtraError(ReedError, ImportError):
    """A domain's optional dependencies are not installed."""


@runtime_checkable
class Domain(Protocol):
    """The per-run object of a domain; the trainer calls exactly these hooks, in this order.

    ``setup`` loads data and targets and returns the resolved config (target dims, model sizes, steps);
    ``build_denoiser`` returns a module whose forward gives ``(prediction, {tap: hidden})``;
    ``host_batches`` returns the ``train.grad_accum`` micro-batches of this process at ``step`` as CPU objects, a
    pure function of (seed, step, rank) that runs in a data-loader worker (:mod:`reed.loader`), and
    ``device_batch`` turns one of them into what ``loss`` takes, on the device, with the step's generator;
    ``loss`` returns ``(scalar loss, {name: detached scalar})`` of one micro-batch;
    ``evaluate`` runs on the EMA model when ``eval_due`` and returns metrics to log (may be empty).
    """

    def setup(self, *, device: torch.device, main_process_first: Callable, progress: bool,
              world: int = 1) -> Config: ...

    def build_denoiser(self) -> nn.Module: ...

    def build_objective(self) -> Objective: ...

    def host_batches(self, step: int, rank: int, world: int) -> list[Any]: ...

    def device_batch(self, host: Any, device: torch.device, generator: torch.Generator) -> Any: ...

    def loss(self, objective: Objective, module: ReedModule, batch: Any, step: int,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def eval_due(self, done: int) -> bool: ...

    def evaluate(self, model: nn.Module, run_dir: Path, step: int, device: torch.device) -> dict: ...

    def title(self) -> str: ...


@dataclass(frozen=True)
class DomainSpec:
    """What a domain registers.

    name: the value of ``domain:`` in a config, and the name of the config section the domain owns.
    config: the dataclass of that section (built from the YAML mapping under ``<name>:``).
    task: ``cfg -> Domain``, the per-run object.
    denoiser: ``resolved cfg -> nn.Module`` (e.g. from the config stored in a checkpoint).
    target_sources: the ``targets.<i>.source`` values the domain understands.
    validate: cross-field checks of the section (raise ConfigError naming the key).
    add_commands: ``(reed.cli.Commands) -> None``, the domain's own ``reed`` subcommands and its flags of
      ``sample`` / ``evaluate``.
    sample / evaluate: ``(args) -> int`` handlers of ``reed sample`` / ``reed evaluate`` for this domain's runs.
    owns_samples: ``path -> bool``, whether ``reed evaluate PATH`` is for this domain (None: only as default).
    resume_may_change: sub-keys of the section that may differ on ``--resume`` (taken from the new config).
    upgrade: ``tree -> tree``, moves the old layout's top-level keys (:data:`reed.config.LEGACY_KEYS`) into the
      section (or drops them where the old layout saved unused defaults); None when the domain never had them.
    legacy_overrides: old-layout override heads that now live in the section (``model.depth=4`` ->
      ``image.model.depth=4``), applied there with a deprecation notice.
    find_unused_parameters: some parameters may get no gradient in a step (DDP must be told).
    objective_terms: the encoder-free terms of the objective (``dispersive``, ``self_align``) the domain's loss
      supports; objective_terms_note: why the others are not (shown in the error).
    """

    name: str
    config: type
    task: Callable[[Config], Domain]
    denoiser: Callable[[Config], nn.Module]
    target_sources: tuple[str, ...] = ()
    validate: Callable[[Config], None] | None = None
    add_commands: Callable[[Any], None] | None = None
    sample: Callable[[Any], int] | None = None
    evaluate: Callable[[Any], int] | None = None
    owns_samples: Callable[[Path], bool] | None = None
    resume_may_change: tuple[str, ...] = ()
    upgrade: Callable[[dict], dict] | None = None
    legacy_overrides: tuple[str, ...] = ()
    find_unused_parameters: bool = False
    objective_terms: tuple[str, ...] = ("dispersive",)
    objective_terms_note: str = ("self-alignment (sra) re-runs the EMA model on the same example at a less noisy "
                                 "time, which this domain's loss does not do")


# name -> module that defines DOMAIN (imported on first use), or the DomainSpec itself
_REGISTRY: dict[str, str | DomainSpec] = {"image": "reed.image", "protein": "reed.protein",
                                          "molecule": "reed.molecule"}


def lazy(target: str) -> Callable[..., Any]:
    """``"package.module:name"`` as a callable that imports the module on first call: a :class:`DomainSpec` can
    name its task, denoiser and CLI handlers without importing their (heavy) modules when the config is parsed."""
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{target}, imported on first call."
    return call


def register_domain(name: str, spec: str | DomainSpec) -> None:
    """Register a domain under ``name``: a :class:`DomainSpec` or the dotted module that defines ``DOMAIN``."""
    if isinstance(spec, DomainSpec) and spec.name != name:
        raise ValueError(f"domain spec is named {spec.name!r}, registered as {name!r}")
    _REGISTRY[name] = spec


def domain_names() -> list[str]:
    """Registered domain names (built-in first)."""
    return list(_REGISTRY)


def get_domain(name: str) -> DomainSpec:
    """The :class:`DomainSpec` of ``name``; ConfigError for an unknown name. (The built-in domains check their extras
    where the dependency is used; a third-party domain package may raise MissingExtraError on import.)"""
    if name not in _REGISTRY:
        raise ConfigError(f"config key 'domain': unknown domain {name!r} (registered: {', '.join(_REGISTRY)})")
    spec = _REGISTRY[name]
    if isinstance(spec, str):
        spec = importlib.import_module(spec).DOMAIN
        _REGISTRY[name] = spec
    return spec


def loaded_domains() -> list[DomainSpec]:
    """The registered domains that import (a package raising MissingExtraError on import is left out)."""
    out = []
    for name in _REGISTRY:
        try:
            out.append(get_domain(name))
        except MissingExtraError:
            continue
    return out


def require_extra(domain: str, extra: str, *modules: str) -> None:
    """Raise one line naming the extra to install when any of ``modules`` is not importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"the {domain} domain needs {', '.join(missing)}: pip install 'reed[{extra}]'")


# --------------------------------------------------------------------------------------------------------------
# set-up shared by every domain


def get_task(cfg: Config) -> Domain:
    """The per-run :class:`Domain` object of ``cfg.domain``."""
    return get_domain(cfg.domain).task(cfg)


def build_denoiser(cfg: Config) -> nn.Module:
    """The denoiser of a resolved config (e.g. the one saved in a checkpoint)."""
    return get_domain(cfg.domain).denoiser(cfg)


def align_terms(cfg: Config) -> list[AlignTerm]:
    """Alignment terms of the config (target ``dim`` must be resolved)."""
    from reed.config import build_from
    from reed.objective import AlignTerm

    return [build_from(AlignTerm, t, dim=int(t.dim or 0), cutoffs=tuple(t.cutoffs)) for t in cfg.targets]


def active_targets(cfg: Config) -> list[TargetConfig]:
    """The target configs the method uses (none for ``sit``, image-modality ones for ``repa``, all for ``reed``):
    the only ones worth loading."""
    from reed.objective import active_terms

    active = {a.name for a in active_terms(align_terms(cfg), cfg.objective.method)}
    return [t for t in cfg.targets if t.name in active]


def resolve_targets(cfg: Config, load: Callable[[list[TargetConfig]], tuple[Any, Mapping[str, int]]]
                    ) -> tuple[Config, Any]:
    """Load the active targets with ``load(target configs) -> (targets, {name: dim})`` and return the config with
    each loaded target's ``dim`` filled in, plus the domain's targets object."""
    targets, dims = load(active_targets(cfg))
    cfg = replace(cfg, targets=[replace(t, dim=int(dims[t.name])) if t.name in dims else t for t in cfg.targets])
    return cfg, targets


def curriculum(cfg: Config, steps_per_unit: int = 1) -> Curriculum:
    """The config's curriculum; for ``unit: epoch`` counts are epochs of ``steps_per_unit`` steps."""
    from reed.config import build_from
    from reed.objective import Curriculum

    c = cfg.objective.curriculum
    unit = steps_per_unit if c.unit == "epoch" else 1
    return build_from(Curriculum, c, total=max(cfg.train.steps // unit, 1), steps_per_unit=unit)


def build_objective(cfg: Config, process: Any, steps_per_unit: int = 1) -> Objective:
    """The REED objective of a resolved config over the domain's generative ``process``."""
    from reed.config import build_from
    from reed.objective import DispersiveTerm, Objective, SelfAlignTerm, method_rule

    o, rule = cfg.objective, method_rule(cfg.objective.method)
    # a null coefficient is the method's choice; the term's other settings are the config's either way
    disp = build_from(DispersiveTerm, o.dispersive, coeff=rule.dispersive if o.dispersive.coeff is None
                      else o.dispersive.coeff)
    sa = build_from(SelfAlignTerm, o.self_align, coeff=rule.self_align if o.self_align.coeff is None
                    else o.self_align.coeff)
    return Objective(process, align_terms(cfg), method=o.method, proj_coeff=o.proj_coeff,
                     curriculum=curriculum(cfg, steps_per_unit), dispersive=disp, self_align=sa)


def load_denoiser(run_or_ckpt: str | Path, *, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(denoiser in eval mode, config, checkpoint dir) from a run directory or a checkpoint directory."""
    from reed.checkpoint import load_into, load_weights, read_config_text, resolve_checkpoint
    from reed.config import config_from_yaml_text

    ckpt = resolve_checkpoint(run_or_ckpt)
    cfg = config_from_yaml_text(read_config_text(ckpt), str(ckpt))
    model = build_denoiser(cfg)
    if use_ema:
        load_into(model, load_weights(ckpt, "ema"), str(ckpt / "ema.safetensors"))
    else:
        w = load_weights(ckpt, "model")
        load_into(model, {k[len("denoiser."):]: v for k, v in w.items() if k.startswith("denoiser.")},
                  str(ckpt / "model.safetensors"))
    return model.to(device).eval().requires_grad_(False), cfg, ckpt


def run_domain(run: str | Path) -> str | None:
    """``domain`` of the config saved with a run or checkpoint (``image`` when the config names none); None when
    there is no readable config there."""
    import yaml

    from reed.checkpoint import read_config_text, resolve_checkpoint
    from reed.config import DEFAULT_DOMAIN

    try:
        tree = yaml.safe_load(read_config_text(resolve_checkpoint(run)))
    except (ReedError, yaml.YAMLError):
        return None
    return str(tree.get("domain") or DEFAULT_DOMAIN) if isinstance(tree, dict) else None
