"""Domains as seen by the trainer. A task loads its data and targets, builds its denoiser and objective, yields
micro-batches, computes the loss of one micro-batch and evaluates the EMA model during training.

Interface (duck-typed; :class:`~reed.image.task.ImageTask` and :class:`~reed.protein.task.ProteinTask`)::

    setup(device=, main_process_first=, progress=, world=) -> Config   # resolved config (dims, steps)
    build_denoiser() -> nn.Module                                     # returns (prediction, {tap: hidden})
    build_objective() -> Objective
    micro_batches(step, rank, world, generator, device) -> iterator of train.grad_accum batches
    loss(objective, module, batch, step, generator) -> (scalar loss, {name: detached scalar})
    eval_due(done_steps) -> bool ; evaluate(ema_model, run_dir, step, device) -> {metric: float}
    title() -> str
"""

from __future__ import annotations

from reed.config import Config
from reed.errors import ConfigError


def get_task(cfg: Config):
    """The task object for ``cfg.domain``."""
    if cfg.domain == "protein":
        from reed.protein.task import ProteinTask

        return ProteinTask(cfg)
    if cfg.domain == "molecule":
        from reed.molecule.task import MoleculeTask

        return MoleculeTask(cfg)
    from reed.image.task import ImageTask

    return ImageTask(cfg)


def build_denoiser(cfg: Config):
    """The denoiser of a resolved config (e.g. the one saved in a checkpoint)."""
    if cfg.domain == "molecule":
        from reed.molecule.task import build_molecule_denoiser

        if not cfg.molecule.elements:
            raise ConfigError("molecule config has no resolved element vocabulary (molecule.elements)")
        return build_molecule_denoiser(cfg, len(cfg.molecule.elements))
    if cfg.domain == "protein":
        from reed.protein.task import build_mpnn_denoiser

        return build_mpnn_denoiser(cfg)
    from reed.image.task import build_sit_denoiser

    return build_sit_denoiser(cfg)
