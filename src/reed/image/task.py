"""The image domain for the trainer: SiT on pixels or VAE latents, flow process, image targets, preview grids."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from reed.config import Config, to_dict
from reed.domains import active_targets, resolve_targets
from reed.domains import build_objective as domain_objective
from reed.errors import ConfigError, DataError
from reed.image.data import batch_indices, load_dataset, to_uint8
from reed.image.sit import SiT, build_sit, drop_labels
from reed.image.targets.prepare import prepare_targets
from reed.io import eval_mode
from reed.objective import Objective, ReedModule
from reed.plots import save_image_grid
from reed.processes.flow import FlowProcess
from reed.sampling.samplers import sample as run_sampler


def resolve_model_config(cfg: Config, ds) -> Config:
    """Fill image.model.input_size / in_channels / num_classes from the data set; error if they contradict it."""
    c, h, w = ds.shape
    if h != w:
        raise ConfigError(f"images must be square for SiT, got {h}x{w}")
    m = cfg.image.model
    for key, have in (("input_size", h), ("in_channels", c)):
        val = getattr(m, key)
        if val is not None and val != have:
            raise ConfigError(f"config key 'image.model.{key}' is {val} but the data set '{ds.name}' has {have}")
    if m.num_classes is not None and m.num_classes < ds.num_classes:
        raise ConfigError(f"config key 'image.model.num_classes' is {m.num_classes} but the data have {ds.num_classes} "
                          "classes")
    m = replace(m, input_size=h, in_channels=c, num_classes=m.num_classes or ds.num_classes)
    return cfg.with_section(model=m)


def build_sit_denoiser(cfg: Config) -> SiT:
    """The SiT described by ``cfg.image.model`` (input_size/in_channels/num_classes must be resolved)."""
    m = cfg.image.model
    over = {k: v for k, v in to_dict(m).items() if k != "preset" and v is not None}
    entangled = [t for t in active_targets(cfg) if t.entangle]
    if entangled:  # REG: the denoiser generates this target's vector as an extra token
        over["cls_dim"] = int(entangled[0].dim or 0)
    try:
        return build_sit(m.preset, **over)
    except ValueError as e:
        raise ConfigError(f"model config: {e}") from None


def build_objective(cfg: Config) -> Objective:
    p = cfg.image.process
    return domain_objective(cfg, FlowProcess(p.path, p.time_sampling, p.lognormal_mean, p.lognormal_std))


def check_depths(cfg: Config, depth: int) -> None:
    for i, t in enumerate(cfg.targets):
        if not isinstance(t.depth, int):
            raise ConfigError(f"config key 'targets.{i}.depth' must be a block index for SiT, got {t.depth!r}")
        if t.depth > depth:
            raise ConfigError(f"config key 'targets.{i}.depth' is {t.depth} but the model has only {depth} blocks")
        if t.kind == "attention" and max(t.attention_blocks) > depth:
            raise ConfigError(f"config key 'targets.{i}.attention_blocks' {t.attention_blocks} reaches beyond the "
                              f"model's {depth} blocks")


def check_token_grids(targets: dict, num_tokens: int) -> None:
    """Refuse, before training, a token target (provider ``shape`` (T, D)) whose T differs from the model's
    ``num_tokens`` and is not a square grid: the alignment resamples square grids only
    (:func:`reed.align.resample_tokens`)."""
    side = math.isqrt(num_tokens)
    for name, provider in targets.items():
        shape = getattr(provider, "shape", None)
        if shape is None or len(shape) != 2 or shape[0] == num_tokens:
            continue
        t = int(shape[0])
        if math.isqrt(t) ** 2 != t:
            raise DataError(f"target '{name}' has {t} tokens per example, which is not a square grid, and the model "
                            f"has {num_tokens} ({side}x{side}): only square token grids can be resampled; give "
                            f"{num_tokens} tokens (or a square number) per example")


@torch.no_grad()
def preview_samples(denoiser: SiT, cfg: Config, num: int, device: torch.device, seed: int) -> torch.Tensor:
    """Class-balanced samples (num,C,H,W) in [-1,1] from ``denoiser`` in eval mode with fixed noise and labels."""
    g = torch.Generator().manual_seed(seed)
    noise = denoiser.initial_state(num, generator=g).to(device)
    y = (torch.arange(num) % cfg.image.model.num_classes).to(device)
    sc = cfg.image.sample
    with eval_mode(denoiser):
        out = run_sampler(denoiser.velocity, noise, y, sampler=sc.sampler, steps=sc.steps,
                          null_class=denoiser.null_class,
                          cfg_scale=denoiser.guidance_scale(sc.cfg_scale, sc.cls_cfg_scale),
                          guidance=(sc.guidance_low, sc.guidance_high),
                          process=FlowProcess(cfg.image.process.path),
                          generator=torch.Generator(device=device).manual_seed(seed + 1))
    return denoiser.image_of(out).float().clamp(-1, 1)


class ImageTask:
    """Class-conditional image generation (SiT + flow). A :class:`reed.domains.Domain`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def setup(self, *, device: torch.device, main_process_first, progress: bool, world: int = 1) -> Config:
        cfg = self.cfg
        self.ds = load_dataset(cfg.image.data)
        cfg = resolve_model_config(cfg, self.ds)

        def load(terms_cfg):  # sit needs no targets, repa only image ones
            with main_process_first():
                targets = prepare_targets(terms_cfg, self.ds, cfg.train.cache_dir, progress=progress, device=device)
            return targets, {name: int(z.dim) for name, z in targets.items()}

        cfg, self.targets = resolve_targets(cfg, load)
        tc = cfg.train
        if tc.batch_size % (world * tc.grad_accum):
            raise ConfigError(f"train.batch_size ({tc.batch_size}) must be divisible by processes x grad_accum "
                              f"({world} x {tc.grad_accum})")
        self.cfg = cfg
        return cfg

    def fingerprint(self) -> str:
        """The training set's fingerprint (stored in checkpoints; resuming on other data is refused)."""
        return self.ds.fingerprint

    def build_denoiser(self) -> SiT:
        den = build_sit_denoiser(self.cfg)
        check_depths(self.cfg, den.depth)
        check_token_grids(self.targets, den.num_tokens)
        return den

    def build_objective(self) -> Objective:
        return build_objective(self.cfg)

    def host_batches(self, step: int, rank: int, world: int) -> list:
        """The ``grad_accum`` micro-batches of this process at ``step`` as read on the host:
        (what x0 is made from, labels (B,), {target: rows}) (:mod:`reed.loader`)."""
        tc = self.cfg.train
        micro = tc.batch_size // world // tc.grad_accum
        idx = batch_indices(step, len(self.ds), tc.batch_size, self.cfg.seed)[rank::world]
        out = []
        for k in range(tc.grad_accum):
            sl = idx[k * micro : (k + 1) * micro]
            out.append((self.ds.read(sl), self.ds.read_labels(sl), {n: t.read(sl) for n, t in self.targets.items()}))
        return out

    def device_batch(self, host, device: torch.device, generator: torch.Generator):
        """(x0 (B,C,H,W), y (B,), {target: (B,T,D)/(B,D)}) on ``device``: the latent posterior draw and online
        encoders run here, with the step's generator."""
        x, y, rows = host
        x0 = self.ds.to_training(x, generator, device)
        return x0, y.to(device, non_blocking=True), {n: self.targets[n].finish(r, device) for n, r in rows.items()}

    def loss(self, objective: Objective, module: ReedModule, batch, step: int, generator: torch.Generator):
        x0, y, z = batch
        null_class = self.cfg.image.model.num_classes
        y = drop_labels(y, self.cfg.image.process.label_dropout, null_class, generator)
        return objective(module, x0, y, z, step, generator=generator)

    def eval_due(self, done: int) -> bool:
        every = self.cfg.train.sample_every
        return every > 0 and (done % every == 0 or done == 1)

    def evaluate(self, model: SiT, run_dir: Path, step: int, device: torch.device) -> dict:
        """Preview grid of EMA samples at ``step``; returns no metrics."""
        cfg = self.cfg
        x = preview_samples(model, cfg, cfg.train.num_preview, device, cfg.seed)
        nrow = cfg.image.model.num_classes if cfg.image.model.num_classes <= 16 else None
        save_image_grid(to_uint8(x), run_dir / "samples" / f"step_{step:07d}.png", nrow=nrow)
        return {}

    def title(self) -> str:
        return f"{self.cfg.objective.method}: {self.cfg.image.model.preset}"
