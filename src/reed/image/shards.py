"""Read side of prepared data: memory-mapped image and VAE-latent shards (written by :mod:`reed.image.prepare`).

On-disk format (spec/image.md §5 facts, sharded ``.npy`` layout of our own)::

    <images>/manifest.json       {"kind": "reed.images", "version": 1, "resolution": R, "count": N, "classes": [...],
                                  "num_classes": K, "shard_size": S, "fingerprint": ..., "shards": [...],
                                  "skipped": [{"file", "error"}], "source": <src dir>}
    <images>/images_00000.npy    uint8 (n, R, R, 3)
    <images>/labels_00000.npy    int64 (n,)
    <images>/sources_00000.txt   one source path (relative to the source folder) per line
    <latents>/manifest.json      {"kind": "reed.latents", "version": 1, "images": <images dir>, "images_fingerprint",
                                  "vae", "vae_fingerprint", "scale", "shift", "latent_channels": C, "latent_size": h,
                                  "count": N, "dtype": "float16" | "float32", "fingerprint", "shards": [...]}
    <latents>/moments_00000.npy  (n, 2C, h, h) = concat[posterior mean, posterior std] (std, not logvar: spec §5)

Global example ``j`` is row ``j - offsets[i]`` of the shard ``i`` with ``offsets[i] <= j < offsets[i + 1]``; latent
shard ``i`` holds the same examples, in the same order, as image shard ``i``. Both readers validate everything cheap
on open (manifest kind/version, that every file exists, its dtype, shape and count) and raise :class:`DataError`
naming the file; :meth:`ImageShards.verify` / :meth:`LatentShards.verify` also re-hash the files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reed.errors import DataError

MANIFEST = "manifest.json"
IMAGES_KIND = "reed.images"
LATENTS_KIND = "reed.latents"
VERSION = 1
SD_VAE_SCALE = 0.18215

__all__ = [
    "IMAGES_KIND",
    "LATENTS_KIND",
    "MANIFEST",
    "SD_VAE_SCALE",
    "VERSION",
    "ImageShards",
    "LatentShards",
    "MissingDataError",
    "fingerprint_of",
    "sample_posterior",
    "sha256_files",
]


class MissingDataError(DataError, FileNotFoundError):
    """A data folder, shard file or model directory does not exist (both a :class:`DataError` and a
    :class:`FileNotFoundError`, so ``except FileNotFoundError`` and the CLI's clean error report both work)."""


def sha256_files(paths: Sequence[str | Path], chunk: int = 1 << 22) -> str:
    """Hex sha256 over the bytes of ``paths``, concatenated in the given order."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def fingerprint_of(shard_checksums: Sequence[str]) -> str:
    """Hex sha256 over the shards' sha256 strings in shard order: the fingerprint of a prepared directory."""
    h = hashlib.sha256()
    for s in shard_checksums:
        h.update(s.encode("ascii"))
    return h.hexdigest()


def read_manifest(directory: str | Path, kind: str) -> dict[str, Any]:
    """Load ``<directory>/manifest.json`` and check its ``kind`` and ``version``; DataError naming the file."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise MissingDataError(f"prepared data directory {directory} does not exist")
    if not path.is_file():
        raise MissingDataError(
            f"{path} not found: {directory} is not a finished prepared directory "
            f"(run `reed prepare {'images' if kind == IMAGES_KIND else 'latents'}`, or let it finish)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        got = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{path}: kind is {got!r}, expected {kind!r}")
    if meta.get("version") != VERSION:
        raise DataError(f"{path}: version {meta.get('version')!r} is not supported (expected {VERSION})")
    return meta


def _field(meta: dict[str, Any], key: str, typ: type | tuple[type, ...], path: Path) -> Any:
    if key not in meta:
        raise DataError(f"{path}: missing field {key!r}")
    val = meta[key]
    if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
        raise DataError(f"{path}: field {key!r} has type {type(val).__name__}")
    return val


def _open_npy(path: Path, dtype: np.dtype | str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Memory-map ``path`` and check it is ``dtype`` with ``shape``; DataError naming the file otherwise."""
    if not path.is_file():
        raise MissingDataError(f"{path}: {what} file is missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several kinds for a damaged .npy
        raise DataError(f"{path}: not a readable .npy ({e})") from None
    if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
        raise DataError(f"{path}: expected {what} {np.dtype(dtype)} {tuple(shape)}, found {arr.dtype} {arr.shape}")
    return arr


def _as_indices(indices: np.ndarray | Sequence[int] | torch.Tensor, n: int) -> np.ndarray:
    if torch.is_tensor(indices):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise IndexError(f"indices must be 1-D, got shape {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise IndexError(f"indices must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise IndexError(f"index {bad} is out of range for {n} examples")
    return idx


def _gather(arrays: list[np.ndarray], offsets: np.ndarray, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[k] = row idx[k] of the concatenation of ``arrays`` (shard s spans [offsets[s], offsets[s+1]))."""
    shard = np.searchsorted(offsets, idx, side="right") - 1
    for s in np.unique(shard):
        sel = np.nonzero(shard == s)[0]
        local = idx[sel] - offsets[s]
        order = np.argsort(local, kind="stable")  # read each shard front to back
        out[sel[order]] = arrays[s][local[order]]
    return out


class ImageShards:
    """Prepared images, memory-mapped: ``images(indices)`` -> uint8 (B, R, R, 3), ``labels`` (N,) int64.

    Attributes: ``directory``, ``meta`` (the manifest), ``resolution`` R, ``classes``, ``num_classes``, ``fingerprint``,
    ``labels``, ``offsets`` ((num_shards + 1,) int64, shard i spans global rows [offsets[i], offsets[i+1])).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.meta = meta = read_manifest(self.directory, IMAGES_KIND)
        mpath = self.directory / MANIFEST
        self.resolution = r = int(_field(meta, "resolution", int, mpath))
        self.classes: list[str] = list(_field(meta, "classes", list, mpath))
        self.num_classes = int(_field(meta, "num_classes", int, mpath))
        self.fingerprint = str(_field(meta, "fingerprint", str, mpath))
        count = int(_field(meta, "count", int, mpath))
        shards = _field(meta, "shards", list, mpath)
        if self.num_classes != len(self.classes):
            raise DataError(f"{mpath}: num_classes {self.num_classes} != {len(self.classes)} class names")
        self._images: list[np.ndarray] = []
        self._sources: list[Path] = []
        labels: list[np.ndarray] = []
        counts: list[int] = []
        for k, entry in enumerate(shards):
            if not isinstance(entry, dict) or entry.get("index") != k:
                raise DataError(f"{mpath}: shards[{k}] is not shard {k}")
            n = int(_field(entry, "count", int, mpath))
            self._images.append(_open_npy(self.directory / entry["images"], np.uint8, (n, r, r, 3), "images"))
            lab = _open_npy(self.directory / entry["labels"], np.int64, (n,), "labels")
            if n and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise DataError(f"{self.directory / entry['labels']}: labels outside [0, {self.num_classes})")
            labels.append(np.array(lab))
            src = self.directory / entry["sources"]
            if not src.is_file():
                raise MissingDataError(f"{src}: sources file is missing")
            self._sources.append(src)
            counts.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        if int(self.offsets[-1]) != count:
            raise DataError(f"{mpath}: count is {count} but the shards hold {int(self.offsets[-1])} examples")
        self.labels: np.ndarray = np.concatenate(labels) if labels else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self._images)

    def images(self, indices: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
        """uint8 images (len(indices), R, R, 3) for global indices in any order, across shards."""
        idx = _as_indices(indices, len(self))
        out = np.empty((idx.size, self.resolution, self.resolution, 3), dtype=np.uint8)
        return _gather(self._images, self.offsets, idx, out)

    def sources(self, indices: np.ndarray | Sequence[int] | torch.Tensor) -> list[str]:
        """Source paths (relative to the manifest's ``source`` folder) of global indices."""
        idx = _as_indices(indices, len(self))
        cache: dict[int, list[str]] = {}
        out = []
        for j in idx:
            s = int(np.searchsorted(self.offsets, j, side="right") - 1)
            if s not in cache:
                text = self._sources[s].read_text(encoding="utf-8", errors="surrogateescape")
                cache[s] = text.splitlines()
            out.append(cache[s][int(j - self.offsets[s])])
        return out

    def verify(self) -> None:
        """Re-hash every shard against the manifest (slow: reads all data); DataError naming a changed shard."""
        for entry in self.meta["shards"]:
            files = [self.directory / entry[k] for k in ("images", "labels", "sources")]
            if sha256_files(files) != entry["sha256"]:
                raise DataError(f"{files[0]}: shard {entry['index']} does not match its checksum in the manifest")


class LatentShards:
    """Prepared VAE posterior moments, memory-mapped: ``moments(indices)`` -> float32 (B, 2C, h, h).

    Attributes: ``directory``, ``meta`` (the manifest), ``scale``, ``shift``, ``latent_channels`` C, ``latent_size`` h,
    ``fingerprint``, ``images_dir``, ``image_shards`` (the :class:`ImageShards` they were encoded from, which supplies
    ``labels`` (N,) int64, ``classes`` and ``num_classes``), ``offsets``.
    Train on ``sample_posterior(moments, scale, shift)``.
    """

    def __init__(self, directory: str | Path, images_dir: str | Path | None = None) -> None:
        self.directory = Path(directory)
        self.meta = meta = read_manifest(self.directory, LATENTS_KIND)
        mpath = self.directory / MANIFEST
        self.scale = float(_field(meta, "scale", (int, float), mpath))
        self.shift = float(_field(meta, "shift", (int, float), mpath))
        self.latent_channels = c = int(_field(meta, "latent_channels", int, mpath))
        self.latent_size = h = int(_field(meta, "latent_size", int, mpath))
        self.dtype = str(_field(meta, "dtype", str, mpath))
        if self.dtype not in ("float16", "float32"):
            raise DataError(f"{mpath}: dtype {self.dtype!r} is not float16 or float32")
        self.fingerprint = str(_field(meta, "fingerprint", str, mpath))
        count = int(_field(meta, "count", int, mpath))
        shards = _field(meta, "shards", list, mpath)
        self._moments: list[np.ndarray] = []
        counts: list[int] = []
        for k, entry in enumerate(shards):
            if not isinstance(entry, dict) or entry.get("index") != k:
                raise DataError(f"{mpath}: shards[{k}] is not shard {k}")
            n = int(_field(entry, "count", int, mpath))
            self._moments.append(_open_npy(self.directory / entry["moments"], self.dtype, (n, 2 * c, h, h), "moments"))
            counts.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        if int(self.offsets[-1]) != count:
            raise DataError(f"{mpath}: count is {count} but the shards hold {int(self.offsets[-1])} examples")

        images = Path(images_dir) if images_dir is not None else Path(str(_field(meta, "images", str, mpath)))
        if not images.is_absolute():
            images = self.directory / images
        self.images_dir = images
        try:
            self.image_shards = ImageShards(images)
        except DataError as e:
            raise type(e)(f"{mpath}: the images these latents were encoded from cannot be read: {e}") from None
        if self.image_shards.fingerprint != meta.get("images_fingerprint"):
            raise DataError(f"{mpath}: images_fingerprint does not match {images / MANIFEST} (images re-prepared?)")
        if not np.array_equal(self.image_shards.offsets, self.offsets):
            raise DataError(f"{mpath}: shard counts differ from those of {images / MANIFEST}")
        self.labels: np.ndarray = self.image_shards.labels
        self.classes: list[str] = self.image_shards.classes
        self.num_classes: int = self.image_shards.num_classes

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self._moments)

    def moments(self, indices: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
        """float32 (len(indices), 2C, h, h) = concat[posterior mean, posterior std] for global indices, any order."""
        idx = _as_indices(indices, len(self))
        c, h = self.latent_channels, self.latent_size
        out = np.empty((idx.size, 2 * c, h, h), dtype=np.float32)
        return _gather(self._moments, self.offsets, idx, out)

    def verify(self) -> None:
        """Re-hash every shard against the manifest (slow); DataError naming a changed shard."""
        for entry in self.meta["shards"]:
            path = self.directory / entry["moments"]
            if sha256_files([path]) != entry["sha256"]:
                raise DataError(f"{path}: shard {entry['index']} does not match its checksum in the manifest")


def _per_channel(v: float | torch.Tensor, ref: torch.Tensor) -> float | torch.Tensor:
    if not torch.is_tensor(v):
        return float(v)
    v = v.to(device=ref.device, dtype=ref.dtype)
    return v.view(1, -1, *([1] * (ref.ndim - 2))) if v.ndim == 1 else v


def sample_posterior(
    moments: torch.Tensor,
    scale: float | torch.Tensor,
    shift: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw a scaled latent from stored moments: (B, 2C, h, w) -> (B, C, h, w), z = (mean + std * eps) * scale + shift.

    ``eps`` ~ N(0, I) is fresh on every call (spec §5: resampled every training step); it is drawn on the generator's
    device when a generator is given (so a CPU generator works with CUDA moments). ``scale`` / ``shift`` are floats or
    per-channel (C,) tensors (0.18215 and 0 for the SD VAE).
    """
    if moments.ndim < 2 or moments.shape[1] % 2:
        raise ValueError(f"moments must be (B, 2C, ...) with an even channel count, got {tuple(moments.shape)}")
    mean, std = moments.chunk(2, dim=1)
    if generator is None:
        eps = torch.randn_like(mean)
    else:
        eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        eps = eps.to(mean.device)
    return (mean + std * eps) * _per_channel(scale, mean) + _per_channel(shift, mean)
