"""An image encoder fitted on the user's own data with a self-supervised objective (VICReg).

For domains with no pretrained encoder (such as the embedded 8×8 digits), REED still needs a frozen encoder
whose representations the denoiser's hidden states are aligned to. :func:`fit_encoder` trains a small CNN
(:class:`ConvEncoder`) with VICReg (Bardes, Ponce & LeCun, 2022) on two augmented views of each image, then
freezes it. Its token grid (``tokens``, ``(B, T, dim)``) serves token-wise alignment targets and its mean
(``pooled``, ``(B, dim)``) pooled ones.

On disk an encoder is a directory with ``encoder.safetensors`` (weights) and ``encoder.json`` (kind, config,
sha256 fingerprint of the weights); see :func:`save_encoder` / :func:`load_encoder`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reed.io import atomic_save_safetensors, atomic_write_json

__all__ = [
    "ConvEncoder",
    "augment",
    "encode_images",
    "encoder_fingerprint",
    "fit_encoder",
    "linear_probe_accuracy",
    "load_encoder",
    "save_encoder",
    "vicreg_loss",
]

ENCODER_KIND = "reed.conv_encoder"
WEIGHTS_NAME = "encoder.safetensors"
CONFIG_NAME = "encoder.json"


# ----------------------------------------------------------------------------------------------- model


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm: no batch statistics, so train and eval behave the same and batch size 1 works.
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(width), nn.GELU(), nn.Conv2d(width, width, 3, padding=1),
            _norm(width), nn.GELU(), nn.Conv2d(width, width, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvEncoder(nn.Module):
    """Small CNN for images ``(B, C, H, W)`` in [-1, 1].

    Layout: 3×3 stem → ``downsample`` stages of (stride-2 3×3 conv, residual block) → (one residual block
    when ``downsample == 0``) → norm, GELU, 1×1 conv to ``dim`` channels. The output feature map has
    ``h = ceil(H / 2**downsample)`` rows and ``w`` columns; for 8×8 input and ``downsample=1`` it is a 4×4
    grid, i.e. 16 tokens.

    Args:
        in_channels: image channels C.
        dim: output feature dimension D (token and pooled).
        width: hidden channel count.
        downsample: number of stride-2 stages.
    """

    def __init__(self, in_channels: int, dim: int = 64, width: int = 64, downsample: int = 1) -> None:
        super().__init__()
        if in_channels < 1 or dim < 1 or width < 1 or downsample < 0:
            raise ValueError(
                f"ConvEncoder: need in_channels, dim, width >= 1 and downsample >= 0, got "
                f"in_channels={in_channels}, dim={dim}, width={width}, downsample={downsample}"
            )
        self.config: dict[str, int] = {
            "in_channels": int(in_channels),
            "dim": int(dim),
            "width": int(width),
            "downsample": int(downsample),
        }
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        stages: list[nn.Module] = []
        for _ in range(downsample):
            down = nn.Conv2d(width, width, 3, stride=2, padding=1)
            stages += [_norm(width), nn.GELU(), down, _ResBlock(width)]
        if downsample == 0:
            stages.append(_ResBlock(width))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(_norm(width), nn.GELU(), nn.Conv2d(width, dim, 1))

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def feature_map(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → ``(B, dim, h, w)``."""
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(
                f"ConvEncoder expects images (B, {self.config['in_channels']}, H, W), got {tuple(x.shape)}"
            )
        return self.head(self.stages(self.stem(x)))

    def tokens(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → ``(B, T, dim)``: the final feature map flattened row-major, ``T = h * w``."""
        return self.feature_map(x).flatten(2).transpose(1, 2)

    def pooled(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → ``(B, dim)``: the mean of :meth:`tokens`."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`pooled`: ``(B, C, H, W)`` → ``(B, dim)``."""
        return self.pooled(x)


# ---------------------------------------------------------------------------------------------- VICReg


def vicreg_loss(
    z1: Tensor, z2: Tensor, *, sim: float = 25.0, var: float = 25.0, cov: float = 1.0
) -> tuple[Tensor, dict[str, float]]:
    """VICReg loss of two batches of embeddings ``z1, z2`` of shape ``(B, D)`` (paired rows), in fp32.

    With ``B`` rows, ``D`` features and per-feature unbiased variance ``Var_b`` over the batch::

        invariance = mean_{b,d} (z1[b,d] - z2[b,d])^2
        variance   = 1/2 * sum_{z in (z1, z2)} mean_d relu(1 - sqrt(Var_b z[:, d] + 1e-4))
        covariance = sum_{z in (z1, z2)} 1/D * sum_{i != j} C(z)[i, j]^2,
                     C(z) = (z - mean_b z)^T (z - mean_b z) / (B - 1)
        loss = sim * invariance + var * variance + cov * covariance

    So identical views give ``invariance = 0``; a batch of constant embeddings has std ``sqrt(1e-4) = 0.01``
    and ``variance = 0.99``; features with std ≥ 1 and no cross-correlation give ``variance = covariance
    = 0``.

    Returns:
        ``(loss, parts)`` with ``loss`` a scalar tensor and ``parts`` the floats ``loss``, ``invariance``,
        ``variance``, ``covariance`` (unweighted terms, for logging).
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"vicreg_loss expects z1, z2 of equal shape (B, D), got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise ValueError(f"vicreg_loss needs a batch of at least 2 rows, got {z1.shape[0]}")
    z1, z2 = z1.float(), z2.float()
    n, d = z1.shape

    invariance = F.mse_loss(z1, z2)

    def std_hinge(z: Tensor) -> Tensor:
        return F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()

    def off_diag_cov(z: Tensor) -> Tensor:
        zc = z - z.mean(dim=0)
        c = zc.T @ zc / (n - 1)
        return (c.pow(2).sum() - c.diagonal().pow(2).sum()) / d

    variance = 0.5 * (std_hinge(z1) + std_hinge(z2))
    covariance = off_diag_cov(z1) + off_diag_cov(z2)
    loss = sim * invariance + var * variance + cov * covariance
    parts = {
        "loss": float(loss.detach()),
        "invariance": float(invariance.detach()),
        "variance": float(variance.detach()),
        "covariance": float(covariance.detach()),
    }
    return loss, parts


# ----------------------------------------------------------------------------------------- augmentations


def _uniform(generator: torch.Generator, n: int, low: float, high: float, device: torch.device) -> Tensor:
    # Draw on the generator's device (CPU or CUDA generator), then move: deterministic per generator state.
    u = torch.rand(n, generator=generator, device=generator.device)
    return (low + (high - low) * u).to(device)


def augment(
    x: Tensor,
    generator: torch.Generator,
    *,
    max_shift: int = 1,
    max_rotation_deg: float = 15.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    noise_std: float = 0.1,
    fill: float = -1.0,
) -> Tensor:
    """Random augmentation of small images (e.g. 8×8 digits), independently per example.

    In order: a translation by up to ``max_shift`` pixels in each axis (pad with ``fill``, random crop),
    a rotation by up to ±``max_rotation_deg`` combined with a zoom by a factor in ``scale_range`` (one
    ``F.affine_grid`` / ``F.grid_sample`` pass, bilinear, outside filled with ``fill``), then additive
    Gaussian noise with std ``noise_std``. No flips: digits are not mirror-invariant.

    Args:
        x: images ``(B, C, H, W)``; ``fill`` is their background value (-1 for images scaled to [-1, 1]).
        generator: source of all randomness; the same generator state gives the same output.

    Returns:
        augmented images ``(B, C, H, W)``, same dtype and device as ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"augment expects images (B, C, H, W), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    dev, dtype = x.device, x.dtype
    x = x.float()

    # 1) translation: pad by max_shift, crop an (H, W) window at a random offset in [0, 2 * max_shift].
    if max_shift > 0:
        s = max_shift
        xp = F.pad(x, (s, s, s, s), value=fill)
        off = torch.randint(0, 2 * s + 1, (2, b), generator=generator, device=generator.device).to(dev)
        rows = off[0][:, None] + torch.arange(h, device=dev)  # (B, H)
        cols = off[1][:, None] + torch.arange(w, device=dev)  # (B, W)
        bidx = torch.arange(b, device=dev)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    # 2) rotation + zoom. affine_grid maps output coordinates to input ones, so zooming in by `scale`
    #    samples the input at coordinates divided by `scale`.
    angle = _uniform(generator, b, -max_rotation_deg, max_rotation_deg, dev) * (math.pi / 180.0)
    scale = _uniform(generator, b, scale_range[0], scale_range[1], dev)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    # grid_sample pads with zeros; shift so the padding is the background value instead.
    x = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill

    # 3) additive Gaussian noise.
    if noise_std > 0:
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(dev)
        x = x + noise_std * noise
    return x.to(dtype)


# --------------------------------------------------------------------------------------------- fitting


def _expander(dim: int, hidden: int) -> nn.Module:
    # The VICReg "expander": the loss acts on its output; it is discarded after fitting.
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden))


def fit_encoder(
    images: Tensor,
    *,
    dim: int = 64,
    width: int = 64,
    downsample: int = 1,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    expander_dim: int = 256,
    weight_decay: float = 1e-4,
    device: str | torch.device | None = None,
) -> tuple[ConvEncoder, list[float]]:
    """Fit a :class:`ConvEncoder` with VICReg on two augmented views of each image.

    The pooled embedding ``(B, dim)`` goes through a 2-layer expander MLP (``dim → expander_dim →
    expander_dim``) and :func:`vicreg_loss` (default weights 25/25/1) compares the two views. AdamW, linear
    warm-up over the first 5% of steps, then cosine decay to 0. For the 1797 digits the defaults (300 steps,
    ≈ 65 ms/step) take about 20 s on 2 idle CPU cores (40 s on one); the pooled features then reach ≈ 0.98
    linear-probe accuracy vs ≈ 0.92 for the same network at random init (0.97 for raw pixels).

    Args:
        images: ``(N, C, H, W)`` images in [-1, 1] (background -1).
        device: where to train; defaults to ``images.device``.

    Returns:
        ``(encoder, losses)``: the encoder (on ``device``) in eval mode with ``requires_grad=False``,
        and the total loss per step (length ``steps``).
    """
    from tqdm.auto import tqdm

    if not isinstance(images, Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4:
        raise ValueError(f"fit_encoder expects images (N, C, H, W), got shape {tuple(images.shape)}")
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"fit_encoder needs at least 2 images, got {n}")
    dev = torch.device(device) if device is not None else images.device
    images = images.to(dev, torch.float32)
    batch_size = min(batch_size, n)

    # Seeded initialisation without touching the global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ConvEncoder(images.shape[1], dim=dim, width=width, downsample=downsample)
        expander = _expander(dim, expander_dim)
    encoder.to(dev).train()
    expander.to(dev).train()
    gen = torch.Generator(device=dev).manual_seed(seed)

    params = list(encoder.parameters()) + list(expander.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    losses: list[float] = []
    bar = tqdm(range(steps), desc="fit encoder (VICReg)", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randperm(n, generator=gen, device=dev)[:batch_size]
        xb = images[idx]
        v1, v2 = augment(xb, gen), augment(xb, gen)
        z = expander(encoder.pooled(torch.cat([v1, v2])))
        loss, parts = vicreg_loss(z[:batch_size], z[batch_size:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
        if progress and (step % 25 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{parts['loss']:.3f}", inv=f"{parts['invariance']:.3f}",
                            var=f"{parts['variance']:.3f}", cov=f"{parts['covariance']:.3f}")  # fmt: skip
    bar.close()

    encoder.eval().requires_grad_(False)
    return encoder, losses


@torch.no_grad()
def encode_images(
    encoder: ConvEncoder, images: Tensor, *, batch_size: int = 512, tokens: bool = False
) -> Tensor:
    """Encode ``(N, C, H, W)`` images in batches → pooled ``(N, dim)`` or, with ``tokens``, ``(N, T, dim)``.

    The output is fp32 on the encoder's device.
    """
    dev = next(encoder.parameters()).device
    fn = encoder.tokens if tokens else encoder.pooled
    chunks = torch.split(torch.as_tensor(images), batch_size)
    outs = [fn(chunk.to(dev, torch.float32)) for chunk in chunks]
    return torch.cat(outs).float()


# ------------------------------------------------------------------------------------------- save / load


def _state_for_disk(encoder: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}


def _fingerprint_state(state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 hex digest of the encoder's weights (names, dtypes, shapes and bytes, in sorted name order)."""
    return _fingerprint_state(_state_for_disk(encoder))


def save_encoder(encoder: ConvEncoder, directory: str | os.PathLike) -> Path:
    """Write ``encoder.safetensors`` and ``encoder.json`` (kind, config, fingerprint) into ``directory``.

    Both files are written to a temporary name and renamed (``os.replace``), the json last, so an interrupted
    save never leaves a half-written file under either name. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _state_for_disk(encoder)
    meta: dict[str, Any] = {
        "kind": ENCODER_KIND,
        "format_version": 1,
        "config": dict(encoder.config),
        "fingerprint": _fingerprint_state(state),
    }
    atomic_save_safetensors(directory / WEIGHTS_NAME, state, metadata={"kind": ENCODER_KIND})
    atomic_write_json(directory / CONFIG_NAME, meta, indent=2, sort_keys=True)
    return directory


def load_encoder(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> ConvEncoder:
    """Load an encoder written by :func:`save_encoder`: eval mode, ``requires_grad=False``.

    Raises:
        FileNotFoundError: the directory, ``encoder.json`` or ``encoder.safetensors`` is missing.
        ValueError: the json is unreadable or not a ``reed.conv_encoder``; the safetensors file is corrupt;
            the weights do not fit the json config or do not match its fingerprint. Messages name the file.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"encoder directory not found: {directory}")
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"encoder file not found: {p}")

    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    ok = isinstance(meta, dict) and meta.get("kind") == ENCODER_KIND and isinstance(meta.get("config"), dict)
    if not ok:
        raise ValueError(f"{cfg_path}: expected a json object with kind={ENCODER_KIND!r} and a 'config' dict")
    try:
        encoder = ConvEncoder(**meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: invalid encoder config {meta['config']}: {e}") from e

    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or garbage files
        raise ValueError(f"{w_path}: corrupt or unreadable safetensors file ({e})") from e
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{w_path}: weights do not match the config in {cfg_path}: {e}") from e
    expected = meta.get("fingerprint")
    if expected is not None and _fingerprint_state(state) != expected:
        raise ValueError(f"{w_path}: weights do not match the fingerprint recorded in {cfg_path}")

    return encoder.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ quality check


def linear_probe_accuracy(
    features: Tensor | np.ndarray, labels: Tensor | np.ndarray, seed: int = 0, test_fraction: float = 0.25
) -> float:
    """Held-out accuracy of a logistic-regression probe on frozen features.

    Args:
        features: ``(N, D)``; labels: ``(N,)`` integer classes.
        seed: seed of the stratified train/test split (``test_fraction`` of the rows held out).

    Features are standardised with statistics of the training split. Returns accuracy in [0, 1].
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x = features.detach().float().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(
            f"linear_probe_accuracy expects features (N, D) and labels (N,), got {x.shape} and {y.shape}"
        )
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=2000)
    clf.fit(scaler.transform(x_tr), y_tr)
    return float(clf.score(scaler.transform(x_te), y_te))
