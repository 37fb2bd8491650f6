"""Image data sets held in memory as (N,C,H,W) float32 in [-1,1] plus integer labels.

``digits`` is the embedded default (sklearn's 1797 real 8x8 digits). ``npz`` reads a user file with
``images`` and ``labels`` (and optionally ``captions``, one string per image, for caption targets).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reed.errors import DataError
from reed.image.config import DataConfig
from reed.io import PICKLE_REFUSED, is_pickle_refusal


class TrainingBatches:
    """The two halves of a training batch (:mod:`reed.loader`): ``read`` on the host (a data-loader worker),
    ``to_training`` on the device with the step's generator; ``batch`` is both at once."""

    labels: torch.Tensor

    def read(self, indices) -> torch.Tensor:
        """What the host reads for global ``indices``: training tensors or what they are made from, on the CPU."""
        raise NotImplementedError

    def to_training(self, x: torch.Tensor, generator: torch.Generator | None,
                    device: torch.device | str) -> torch.Tensor:
        """The clean training tensors (B,C,H,W) from what :meth:`read` returned, on ``device``."""
        return x.to(device, non_blocking=True)

    def read_labels(self, indices) -> torch.Tensor:
        return self.labels[torch.as_tensor(indices, dtype=torch.long)]

    def batch(self, indices, *, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Clean training tensors (B,C,H,W) and labels (B,) for global ``indices``, on ``device``."""
        return self.to_training(self.read(indices), generator, device), self.read_labels(indices).to(device)


@dataclass
class ImageDataset(TrainingBatches):
    """In-memory image data set.

    images (N,C,H,W) float32 in [-1,1]; labels (N,) int64 in [0, num_classes).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    captions: list[str] | None = None
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            h = hashlib.sha256()
            h.update(self.images.numpy().tobytes())
            h.update(self.labels.numpy().tobytes())
            self.fingerprint = h.hexdigest()[:16]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the training tensors."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def read(self, indices) -> torch.Tensor:
        """Training tensors (B,C,H,W) in [-1,1] for global ``indices``."""
        return self.images[torch.as_tensor(indices, dtype=torch.long)]

    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) float in [-1,1] (what pixel-space encoders such as the fitted one see)."""
        return self.images[indices]

    def raw_images(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images (B,C,H,W) for encoders that see the raw picture."""
        return ((self.images[indices].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(x: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """(N,C,H,W) in [-1,1] -> ADM layout (N,H,W,C) uint8: round(127.5 (x + 1)), or with ``truncate`` the reference
    generate.py's conversion, clamp(255 (x + 1) / 2) cast to uint8 (rounds down: about half a grey level darker)."""
    v = (x.float().clamp(-1, 1) + 1) * 127.5  # == 255 * ((x + 1) / 2) exactly: the division by 2 is exact
    return (v if truncate else v.round()).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _from_npz(path: Path) -> ImageDataset:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as arrs:  # object arrays / pickles are refused, never unpickled
            keys = set(arrs.files)
            for k in ("images", "labels"):
                if k not in keys:
                    raise DataError(f"data file {path} has no '{k}' array (found: {sorted(keys)})")
            imgs, labels = arrs["images"], arrs["labels"]
            raw_captions = arrs["captions"] if "captions" in keys else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds for a bad file
        if is_pickle_refusal(e):
            raise DataError(f"data file {path} {PICKLE_REFUSED}") from None
        raise DataError(f"data file {path} is not a readable .npz ({e})") from None
    if imgs.size == 0 or labels.size == 0:
        raise DataError(f"data file {path} is empty: 'images' has shape {imgs.shape}, 'labels' {labels.shape}")
    if imgs.dtype == np.uint8:
        if imgs.ndim == 3:
            imgs = imgs[..., None]
        if imgs.ndim != 4:
            raise DataError(f"{path}: uint8 'images' must be (N,H,W) or (N,H,W,C), got {imgs.shape}")
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    else:
        if imgs.ndim != 4:
            raise DataError(f"{path}: float 'images' must be (N,C,H,W) in [-1,1], got {imgs.shape}")
        x = torch.from_numpy(np.ascontiguousarray(imgs, dtype=np.float32))
        if not torch.isfinite(x).all():
            raise DataError(f"{path}: 'images' contains NaN or inf")
        if x.min() < -1.0001 or x.max() > 1.0001:
            raise DataError(f"{path}: float 'images' must lie in [-1,1], got range [{x.min():.3g}, {x.max():.3g}]")
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise DataError(f"{path}: 'labels' must be (N,) with N={x.shape[0]} like 'images', got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"{path}: 'labels' must be non-negative integers")
    captions = None
    if raw_captions is not None:
        captions = [str(c) for c in raw_captions]
        if len(captions) != x.shape[0]:
            raise DataError(f"{path}: 'captions' has {len(captions)} entries but there are {x.shape[0]} images")
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(path.stem, x.contiguous(), y, int(y.max()) + 1, captions)


def load_dataset(cfg: DataConfig):
    """Build the data set named by ``cfg``: an in-memory :class:`ImageDataset` (digits, npz) or a sharded one
    (``images``: prepared uint8 shards trained in pixel space; ``latents``: VAE latents, posterior sampled per step)."""
    if cfg.name in ("images", "latents"):
        from reed.image.sharded import LatentDataset, PixelShardDataset

        if not cfg.path:
            raise DataError(f"image.data.path is required for image.data.name={cfg.name}")
        return PixelShardDataset(cfg.path) if cfg.name == "images" else LatentDataset(cfg.path)
    if cfg.name == "digits":
        from reed.image.digits import load_digits_arrays

        imgs, labels = load_digits_arrays()
        return ImageDataset("digits", torch.from_numpy(imgs), torch.from_numpy(labels), 10)
    if cfg.name == "shapes":
        from reed.image.shapes import RESOLUTIONS, load_shapes

        if cfg.size < 2 or cfg.resolution not in RESOLUTIONS:
            raise DataError(f"image.data.name=shapes needs image.data.size >= 2 and image.data.resolution in "
                            f"{RESOLUTIONS}, got size={cfg.size}, resolution={cfg.resolution}")
        return load_shapes(cfg.size, seed=cfg.seed, resolution=cfg.resolution)
    if cfg.name == "npz":
        if not cfg.path:
            raise DataError("image.data.path is required for image.data.name=npz")
        return _from_npz(Path(cfg.path))
    raise DataError(f"unknown data set '{cfg.name}'")


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Example indices of global batch ``step``: a seeded permutation per epoch, cut into full batches.

    A pure function of (step, n, batch_size, seed), so a resumed run sees exactly the batches it would have seen.
    """
    if batch_size > n:
        raise DataError(f"train.batch_size ({batch_size}) is larger than the data set ({n} examples)")
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    return _epoch_permutation(n, seed, epoch)[k * batch_size : (k + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)
