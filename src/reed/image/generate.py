"""Generate samples from a trained run: ADM-layout ``.npz`` (``arr_0`` uint8 (N,H,W,C), ``arr_1`` labels),
a PNG grid and a JSON record of every sampling setting.

Two sampling protocols (``image.sample.protocol``, ``reed sample --protocol``):

* ``reed`` — class-balanced labels (i mod K), the VAE the run's latents were encoded with, pixels rounded to uint8.
* ``paper`` — the reference generate.py (spec image.md §7): labels drawn uniformly at random (no class balance),
  decoded with ``stabilityai/sd-vae-ft-ema`` unless ``--vae`` (or ``reed import --vae``) names the decoder (the
  training latents come from ft-mse, which shares its encoder),
  pixels clamp(255 (x + 1) / 2) truncated to uint8. The random streams are reed's (a pure function of the seed
  and the chunk, independent of the number of processes), not the reference's per-GPU seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from reed.checkpoint import read_config_text, resolve_checkpoint
from reed.config import config_from_yaml_text
from reed.domains import load_denoiser
from reed.errors import CheckpointError, ConfigError
from reed.image.data import to_uint8
from reed.io import atomic_save_npy, atomic_savez, atomic_write_json, atomic_write_text, pick_device, progress_bar
from reed.plots import save_image_grid
from reed.processes.flow import FlowProcess
from reed.sampling.samplers import sample as run_sampler

PAPER_VAE = "stabilityai/sd-vae-ft-ema"  # the reference generate.py's default decoder (--vae ema)
# protocol -> (label policy, default VAE (None: the run's), uint8 conversion)
PROTOCOLS: dict[str, tuple[str, str | None, str]] = {"reed": ("balanced", None, "round"),
                                                     "paper": ("random", PAPER_VAE, "truncate")}


class LatentDecoder:
    """Latents (B,C,h,w) -> images (B,3,H,W) in [-1,1] via a diffusers AutoencoderKL: x = D((z - shift)/scale)."""

    def __init__(self, vae: str, scale: float, shift: float, device: torch.device):
        from reed.image.prepare import load_vae

        self.vae, self.name, _ = load_vae(vae, device)
        self.scale, self.shift = scale, shift

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z.float() - self.shift) / self.scale).sample.clamp(-1, 1)


def latent_decoder(cfg, ckpt: Path, vae: str | None, device: torch.device,
                   default: str | None = None) -> LatentDecoder | None:
    """The VAE decoder for a latent-space run; None for pixel-space runs.

    ``vae`` if given, else the decoder named at ``reed import --vae``, else the protocol's ``default`` (the paper's
    ``sd-vae-ft-ema``), else the VAE the run's latents were encoded with."""
    if cfg.image.data.name != "latents":
        return None
    scale, shift, recorded = 0.18215, 0.0, None
    if cfg.image.data.path and (Path(cfg.image.data.path) / "manifest.json").is_file():
        man = json.loads((Path(cfg.image.data.path) / "manifest.json").read_text())
        scale, shift, recorded = float(man.get("scale", scale)), float(man.get("shift", shift)), man.get("vae")
    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else {}
    chosen = vae or state.get("extra", {}).get("vae") or default or recorded
    if not chosen:
        raise CheckpointError(f"{ckpt} is a latent-space model: pass --vae (a diffusers AutoencoderKL dir or hub id) "
                              "to decode its samples")
    return LatentDecoder(chosen, scale, shift, device)


def _labels(num: int, k: int, policy: str, seed: int) -> torch.Tensor:
    """Labels (num,): ``balanced`` = i mod K; ``random`` = uniform, a pure function of ``seed``."""
    if policy == "balanced":
        return torch.arange(num) % k
    if policy == "random":
        return torch.randint(0, k, (num,), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"labels must be 'balanced' or 'random', got {policy!r}")


def resolve_protocol(protocol: str | None, labels: str | None, configured: str) -> tuple[str, str, str | None, str]:
    """(protocol, label policy, default VAE, uint8 conversion) for ``--protocol`` / ``--labels`` (None: not given)
    over the run's ``image.sample.protocol``; ConfigError for an unknown protocol or labels contradicting ``paper``."""
    protocol = protocol or configured
    if protocol not in PROTOCOLS:
        raise ConfigError(f"sampling protocol (--protocol / image.sample.protocol) must be one of "
                          f"{', '.join(PROTOCOLS)}, got {protocol!r}")
    policy, default_vae, uint8 = PROTOCOLS[protocol]
    if labels is not None and labels != policy and protocol == "paper":
        raise ConfigError(f"--labels {labels} contradicts --protocol paper (the reference draws labels uniformly "
                          "at random); drop --labels or use --protocol reed")
    return protocol, labels or policy, default_vae, uint8


def _chunk_seed(seed: int, chunk: int) -> int:
    return seed * 1_000_003 + chunk


@torch.no_grad()
def generate(run_or_ckpt: str | Path, *, num: int, out: str | Path | None = None, sampler: str | None = None,
             steps: int | None = None, cfg_scale: float | None = None, cls_cfg_scale: float | None = None,
             guidance: tuple[float | None, float | None] = (None, None), seed: int = 0, batch_size: int = 256,
             use_ema: bool = True, labels: str | None = None, protocol: str | None = None, device: str | None = None,
             progress: bool = True, vae: str | None = None, process_index: int = 0, num_processes: int = 1,
             barrier=None, keep_parts: bool = False) -> dict:
    """Sample ``num`` images into an ADM-layout ``.npz``; settings default to the run's ``image.sample`` config.

    ``protocol`` (default ``image.sample.protocol``) sets the label policy, the default VAE and the uint8
    conversion (module docstring); ``labels`` overrides the ``reed`` protocol's balanced labels (``random``), and
    contradicting the ``paper`` protocol's random labels is refused.

    Work is cut into chunks of ``batch_size`` samples; chunk c uses noise seeded by (seed, c) and is done by process
    ``c % num_processes`` (``accelerate launch``), written atomically to ``<out>.parts/``, and skipped when a rerun
    finds it: an interrupted job resumes, and the result does not depend on the number of processes. After
    ``barrier()``, process 0 packs the first ``num`` samples (``arr_0`` uint8 (N,H,W,C), ``arr_1`` labels), a PNG grid
    and a JSON record of every setting. Returns that record (process 0) or this process's report.
    """
    dev = pick_device(device)
    torch.set_flush_denormal(True)  # CPU: denormal activations otherwise slow small models several-fold
    ck = resolve_checkpoint(run_or_ckpt)  # the protocol is checked before the model loads
    configured = config_from_yaml_text(read_config_text(ck), str(ck)).image.sample.protocol
    protocol, labels, default_vae, uint8 = resolve_protocol(protocol, labels, configured)
    model, cfg, ckpt = load_denoiser(ck, use_ema=use_ema, device=dev)
    sc = cfg.image.sample
    settings = {
        "sampler": sampler or sc.sampler, "steps": steps or sc.steps,
        "cfg_scale": sc.cfg_scale if cfg_scale is None else cfg_scale,
        "cls_cfg_scale": sc.cls_cfg_scale if cls_cfg_scale is None else cls_cfg_scale,
        "guidance_low": sc.guidance_low if guidance[0] is None else guidance[0],
        "guidance_high": sc.guidance_high if guidance[1] is None else guidance[1],
    }
    k = cfg.image.model.num_classes
    ys = _labels(num, k, labels, seed)
    decoder = latent_decoder(cfg, ckpt, vae, dev, default=default_vae)
    out = Path(out) if out else Path(run_or_ckpt) / "samples.npz"
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    job = {"checkpoint": str(ckpt), "num": num, "batch_size": batch_size, "labels": labels, "seed": seed,
           "weights": "ema" if use_ema else "raw", "protocol": protocol, "uint8": uint8,
           "vae": decoder.name if decoder is not None else None, **settings}
    job_file = parts / "job.json"
    if job_file.is_file() and json.loads(job_file.read_text()) != job:
        raise CheckpointError(f"{parts} holds parts of a different sampling job; delete it or choose another --out")
    if process_index == 0:
        atomic_write_text(job_file, json.dumps(job))
    n_chunks = (num + batch_size - 1) // batch_size
    mine = [ch for ch in range(n_chunks) if ch % num_processes == process_index]
    todo = [ch for ch in mine if not (parts / f"chunk_{ch:06d}.npy").is_file()]
    for ch in progress_bar(todo, progress, f"sample [{process_index}/{num_processes}]"):
        lo, hi = ch * batch_size, min((ch + 1) * batch_size, num)
        g = torch.Generator().manual_seed(_chunk_seed(seed, ch))
        y = ys[lo:hi].to(dev)
        noise = model.initial_state(hi - lo, generator=g).to(dev)
        sde_gen = torch.Generator(device=dev).manual_seed(_chunk_seed(seed, ch) + 1)
        x = model.image_of(run_sampler(model.velocity, noise, y, sampler=settings["sampler"],
                                       steps=settings["steps"], null_class=model.null_class,
                                       cfg_scale=model.guidance_scale(settings["cfg_scale"],
                                                                      settings["cls_cfg_scale"]),
                                       guidance=(settings["guidance_low"], settings["guidance_high"]),
                                       process=FlowProcess(cfg.image.process.path), generator=sde_gen))
        imgs = to_uint8(decoder(x) if decoder is not None else x, truncate=uint8 == "truncate")
        atomic_save_npy(parts / f"chunk_{ch:06d}.npy", imgs)
    if barrier is not None:
        barrier()
    if process_index != 0:
        return {"chunks_done": len(todo), "chunks_skipped": len(mine) - len(todo)}
    missing = [ch for ch in range(n_chunks) if not (parts / f"chunk_{ch:06d}.npy").is_file()]
    if missing:
        raise CheckpointError(f"sampling chunks {missing[:8]} are missing in {parts}; rerun to complete them")
    images = np.concatenate([np.load(parts / f"chunk_{ch:06d}.npy") for ch in range(n_chunks)])[:num]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_savez(out, {"arr_0": images, "arr_1": ys.numpy().astype(np.int64)})
    grid = save_image_grid(images[: min(num, 100)], out.with_suffix(".png"), nrow=k if k <= 16 else None)
    record = {"num": int(num), "npz": str(out), "grid": str(grid), "checkpoint": str(ckpt),
              "weights": "ema" if use_ema else "raw", "protocol": protocol, "labels": labels, "uint8": uint8,
              "seed": seed, "batch_size": batch_size,
              "num_processes": num_processes, "vae": decoder.name if decoder is not None else None, **settings}
    atomic_write_json(out.with_suffix(".json"), record, indent=2)
    if not keep_parts:
        import shutil

        shutil.rmtree(parts, ignore_errors=True)
    return record
