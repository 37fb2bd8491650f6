"""Standard image-generation metrics, ported from the OpenAI ADM evaluation suite, plus FD_DINOv2.

Published ImageNet 256×256 numbers (REPA / REED / REG …, spec ``anchors.md`` §5) come from ADM's TF1
``evaluations/evaluator.py``: the sample batch is a ``.npz`` with ``arr_0`` uint8 ``(N, H, W, 3)`` (N = 50,000 for
FID-50K) and the reference batch is ``VIRTUAL_imagenet256_labeled.npz`` (``arr_0`` = 10,000 reference images plus
precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s``). This module computes the same quantities in PyTorch with the
TF-ported Inception of :mod:`reed.image.metrics.inception`:

* **FID** — Fréchet distance of Gaussians fitted to ``pool_3`` features (2048-d) of samples and reference.
* **sFID** — the same on ``mixed_6/conv`` features (first 7 channels of the 17×17 map, 2023-d).
* **Inception Score** — ``exp(E_x KL(p(y|x) || p(y)))`` with ``p(y|x) = softmax(pool_3 @ W)`` (1008 classes, no
  bias, as ADM), averaged over ``splits`` contiguous chunks (10 chunks = ADM's ``split_size=5000`` at N = 50,000).
* **Precision / recall** — improved precision and recall (Kynkäänniemi et al. 2019) on ``pool_3`` features with
  k = 3: each set's manifold is the union of balls reaching each point's k-th nearest neighbour (self excluded);
  precision = fraction of samples inside the reference manifold, recall = fraction of reference images inside
  the sample manifold. The reference side uses the reference *images* (``arr_0``: 10,000 for ADM's batch).
* **FD_DINOv2** — Fréchet distance of DINOv2 features (EDM2 / dgm-eval), see :func:`fd_dinov2`.

Inputs (an *image source*): a uint8 array ``(N, H, W, 3)``, a ``.npz`` path (``arr_0``, streamed in batches), a
``.npy`` path, or a directory of images (recursive, sorted by relative path, converted to RGB).

Reference statistics are cached under ``<cache_dir>/fid_refs/`` keyed by a sha256 fingerprint of the source's
contents and of the network's weights + preprocessing (:func:`reference_statistics`).

Known deviations from ADM's TF1 numbers (expect agreement to a few hundredths of FID, not bit-exactness):
float32 convolutions in PyTorch/cuDNN instead of TF; k-NN distances in float32 (ADM computes them in float16 when
finite); IS splits via ``np.array_split`` (identical to ADM when N is a multiple of 5,000 × 10 / 10).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import torch
import torch.nn.functional as F

from reed import __version__
from reed.errors import ConfigError, DataError
from reed.image.metrics.frechet import feature_stats, frechet_distance
from reed.image.metrics.inception import PREPROCESSING, FIDInceptionV3, full_fp32, load_inception
from reed.io import PICKLE_REFUSED, atomic_savez, is_pickle_refusal, pick_device, progress_bar

__all__ = [
    "IMAGE_EXTENSIONS",
    "METRICS",
    "compute_features",
    "dinov2_features",
    "evaluate",
    "fd_dinov2",
    "fid",
    "inception_score",
    "precision_recall",
    "reference_statistics",
    "sfid",
    "source_fingerprint",
]

ImageSource = np.ndarray | str | os.PathLike

#: File suffixes read from an image directory.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: Metric names accepted by :func:`evaluate` (aliases: ``inception_score`` → ``is``, ``precision``/``recall`` → ``pr``).
METRICS = ("fid", "sfid", "is", "pr", "fd_dinov2")
_ALIASES = {"inception_score": "is", "isc": "is", "precision": "pr", "recall": "pr", "prc": "pr",
            "fd-dinov2": "fd_dinov2", "fdd": "fd_dinov2"}
#: Bump when cached reference statistics change meaning.
_CACHE_VERSION = 1
#: FD_DINOv2 input preprocessing (EDM2 ``DINOv2Detector(resize_mode="torch")``).
DINOV2_PREPROCESSING = "uint8->float32; bicubic antialias resize 224x224 (0..255); /255; ImageNet normalise"
#: Sample count of the published FID-50K protocol.
FID_PROTOCOL_SAMPLES = 50_000


# ================================================================================================ image sources


class _ImageReader:
    """Sized batch iterator over uint8 ``(h, w, 3)`` images from an array, ``.npz`` / ``.npy`` file or directory."""

    def __init__(self, source: ImageSource) -> None:
        self.array: np.ndarray | None = None
        self.npz: Path | None = None
        self.files: list[Path] | None = None
        if isinstance(source, np.ndarray):
            self.description = f"array{tuple(source.shape)}"
            self.array = _check_images(source, self.description)
            self.n = len(source)
            return
        if not isinstance(source, (str, os.PathLike)):
            raise DataError(f"unsupported image source of type {type(source).__name__}: pass a uint8 (N, H, W, 3) "
                            "array, a .npz / .npy file, or an image directory")
        path = Path(source).expanduser()
        self.description = str(path)
        if path.is_dir():
            self.files = sorted((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                                key=lambda p: p.relative_to(path).as_posix())
            if not self.files:
                raise DataError(f"image directory {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            self.n = len(self.files)
        elif not path.is_file():
            raise DataError(f"image source {path} does not exist")
        elif path.suffix == ".npz":
            keys = _npz_keys(path)
            if "arr_0" not in keys:
                raise DataError(f"{path} has no 'arr_0' image array (keys: {sorted(keys)})")
            self.npz = path
            with _open_npy_member(path, "arr_0") as (_, shape, dtype, _fortran):
                _check_images(np.empty((0, *shape[1:]), dtype), f"{path}:arr_0", shape)
                self.n = int(shape[0])
        elif path.suffix == ".npy":
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as e:  # noqa: BLE001 - numpy raises several kinds for a bad .npy
                if is_pickle_refusal(e):
                    raise DataError(f"{path} {PICKLE_REFUSED}") from None
                raise DataError(f"{path} is not a readable .npy file ({e})") from None
            self.array = _check_images(arr, str(path))
            self.n = len(self.array)
        else:
            raise DataError(f"unsupported image source {path}: expected a .npz (arr_0), a .npy or a directory")

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, num_workers: int = 4) -> Iterator[list[np.ndarray]]:
        """Yields, per batch, a list of uint8 arrays ``(b, h, w, 3)`` (one per distinct image size in the batch)."""
        if self.array is not None:
            for i in range(0, self.n, batch_size):
                yield [np.array(self.array[i : i + batch_size], dtype=np.uint8, copy=True)]
        elif self.npz is not None:
            yield from self._npz_batches(batch_size)
        else:
            assert self.files is not None
            workers = max(1, min(num_workers, os.cpu_count() or 1))
            with ThreadPoolExecutor(workers) as pool:
                for i in range(0, self.n, batch_size):
                    yield _group_by_shape(list(pool.map(_read_image, self.files[i : i + batch_size])))

    def _npz_batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        assert self.npz is not None
        with _open_npy_member(self.npz, "arr_0") as (f, shape, dtype, fortran):
            if f is None or fortran:  # unusual layout: load it whole
                arr = _check_images(np.load(self.npz)["arr_0"], f"{self.npz}:arr_0")
                for i in range(0, len(arr), batch_size):
                    yield [np.array(arr[i : i + batch_size], dtype=np.uint8, copy=True)]
                return
            per_image = int(np.prod(shape[1:])) * dtype.itemsize
            for i in range(0, shape[0], batch_size):
                b = min(batch_size, shape[0] - i)
                buf = bytearray(b * per_image)
                view, got = memoryview(buf), 0
                while got < len(buf):
                    chunk = f.read(len(buf) - got)
                    if not chunk:
                        raise DataError(f"{self.npz}: arr_0 ends early (image {i + got // per_image} of {shape[0]})")
                    view[got : got + len(chunk)] = chunk
                    got += len(chunk)
                yield [np.frombuffer(buf, dtype=dtype).reshape(b, *shape[1:]).astype(np.uint8, copy=False)]


def require_uint8(dtype: np.dtype, name: str) -> None:
    """Refuse sample / reference images that are not uint8 0..255: the networks read pixel values as 0..255 grey
    levels, so float images (in [0, 1] or [-1, 1]) would be scored as nearly black pictures."""
    if np.dtype(dtype) != np.uint8:
        raise DataError(f"{name}: images must be uint8 0..255 (ADM layout), got dtype {np.dtype(dtype)}; convert "
                        "them first, e.g. floats in [0, 1]: np.rint(x * 255).astype(np.uint8), in [-1, 1]: "
                        "np.rint((x + 1) * 127.5).astype(np.uint8)")


def _check_images(arr: np.ndarray, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    shape = tuple(arr.shape) if shape is None else tuple(shape)
    require_uint8(arr.dtype, name)
    if len(shape) != 4 or shape[-1] != 3:
        raise DataError(f"{name}: images must have shape (N, H, W, 3) (channels last, RGB), got {shape}")
    return arr


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # a corrupt file: name it
        raise DataError(f"cannot read image {path}: {e}") from e


def _group_by_shape(images: list[np.ndarray]) -> list[np.ndarray]:
    groups: list[list[np.ndarray]] = []
    for im in images:
        if groups and groups[-1][0].shape == im.shape:
            groups[-1].append(im)
        else:
            groups.append([im])
    return [np.stack(g) for g in groups]


def _npz_keys(path: Path) -> set[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from e


class _open_npy_member:
    """Context manager: ``(file | None, shape, dtype, fortran)`` of ``<name>.npy`` inside an ``.npz``, streaming.

    ``file`` is ``None`` when the header format is not a plain v1/v2 array (the caller then loads it whole).
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self._zf: zipfile.ZipFile | None = None
        self._f = None

    def __enter__(self):
        self._zf = zipfile.ZipFile(self.path)
        self._f = self._zf.open(f"{self.name}.npy")
        version = np.lib.format.read_magic(self._f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._f)
        else:
            arr = np.load(self.path)[self.name]
            return None, tuple(arr.shape), arr.dtype, False
        if dtype.hasobject:
            raise DataError(f"{self.path}:{self.name} holds Python objects, not an image array")
        return self._f, tuple(shape), dtype, bool(fortran)

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()
        if self._zf is not None:
            self._zf.close()


def source_fingerprint(source: ImageSource) -> str:
    """``"sha256:<hex>"`` over an image source's contents (array bytes + shape, file bytes, or every file in a
    directory with its relative path). Used to key cached reference statistics; reads the whole source once."""
    h = hashlib.sha256()
    if isinstance(source, np.ndarray):
        h.update(f"array|{source.shape}|{source.dtype}|".encode())
        step = max(1, (1 << 26) // max(1, source[:1].nbytes))
        for i in range(0, len(source), step):
            h.update(np.ascontiguousarray(source[i : i + step]).data)
        return "sha256:" + h.hexdigest()
    path = Path(source).expanduser()
    if path.is_dir():
        reader = _ImageReader(path)
        assert reader.files is not None
        h.update(b"dir|")
        for f in reader.files:
            h.update(f.relative_to(path).as_posix().encode() + b"|")
            _hash_file(h, f)
    elif path.is_file():
        h.update(b"file|")
        _hash_file(h, path)
    else:
        raise DataError(f"image source {path} does not exist")
    return "sha256:" + h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)


def _describe(source: Any) -> str:
    if isinstance(source, np.ndarray):
        return f"array{tuple(source.shape)}"
    if isinstance(source, Mapping):
        return str(source.get("source", "<statistics>"))
    return str(Path(source).expanduser())


# ================================================================================================ features


def _as_inception(inception: FIDInceptionV3 | str | os.PathLike | None, device: torch.device) -> FIDInceptionV3:
    if isinstance(inception, FIDInceptionV3):
        return inception.to(device)
    return load_inception(inception, device=device)


def compute_features(
    images: ImageSource,
    *,
    inception: FIDInceptionV3 | str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    outputs: Sequence[str] = ("pool", "spatial", "logits"),
    num_workers: int = 4,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Inception features of every image of a source.

    Args:
        images: uint8 array ``(N, H, W, 3)``, ``.npz`` path (``arr_0``, streamed), ``.npy`` path or image directory.
        inception: a loaded :class:`FIDInceptionV3`, a weights path, or ``None`` (``$REED_INCEPTION_WEIGHTS``).
            A given module is moved to ``device``.
        batch_size: images per forward pass (ADM uses 64).
        device: ``None`` = CUDA if available, else CPU.
        outputs: which of ``"pool"`` (N, 2048), ``"spatial"`` (N, 2023), ``"logits"`` (N, K) to keep.
        num_workers: threads decoding image files (directories only).
        progress: show a tqdm bar.

    Returns:
        ``{name: float32 array (N, dim)}`` for each requested output, in source order.
    """
    bad = [o for o in outputs if o not in ("pool", "spatial", "logits")]
    if bad:
        raise ConfigError(f"unknown Inception outputs {bad}; choose from pool, spatial, logits")
    dev = pick_device(device)
    net = _as_inception(inception, dev)
    reader = _ImageReader(images)
    parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    total = math.ceil(len(reader) / batch_size)
    for groups in progress_bar(reader.batches(batch_size, num_workers), progress, "inception", total=total,
                              unit="batch"):
        for g in groups:
            out = net(torch.from_numpy(g).to(dev).permute(0, 3, 1, 2))
            for o in outputs:
                parts[o].append(out[o].cpu().numpy())
    dims = {"pool": 2048, "spatial": 2023, "logits": net.num_classes}
    return {o: (np.concatenate(v) if v else np.zeros((0, dims[o]), np.float32)) for o, v in parts.items()}


def _dinov2_pooling(encoder) -> str:
    """``"cls"`` for Hugging Face DINOv2 encoders (CLS token at position 0), else ``"mean"`` of the patch tokens."""
    spec = getattr(encoder, "spec", None)
    family = getattr(spec, "family", None)
    return "cls" if family in ("dinov2", "dinov2reg") and hasattr(encoder, "model") else "mean"


def _dinov2_preprocessing(pooling: str) -> str:
    return DINOV2_PREPROCESSING + "; CLS token" if pooling == "cls" else "encoder preprocessing; mean of patch tokens"


@torch.no_grad()
def _dinov2_batch(encoder, images: torch.Tensor, pooling: str) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` → features ``(B, D)`` float32."""
    if pooling == "mean":
        return encoder(images).mean(dim=1).float()
    x = F.interpolate(images.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True)
    mean = torch.tensor(encoder.spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    out = encoder.model(pixel_values=x.to(encoder.dtype))
    return out.last_hidden_state[:, 0].float()


def dinov2_features(
    images: ImageSource,
    encoder,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 4,
    progress: bool = True,
) -> np.ndarray:
    """DINOv2 features ``(N, D)`` float32 of an image source, as used by :func:`fd_dinov2`.

    For a DINOv2 encoder from :func:`reed.image.targets.encoders.load_image_encoder` (``dinov2-vit-*``,
    ``dinov2reg-vit-*``) this is EDM2's / dgm-eval's FD_DINOv2 feature: the images (0..255, float32) are resized
    to 224×224 with antialiased bicubic interpolation (whatever their size), divided by 255, ImageNet-normalised,
    and the **CLS token after the final LayerNorm** is taken. Any other encoder (whose tokens carry no CLS) gives
    the **mean of its patch tokens** under its own preprocessing.

    Note: the position-embedding table is resampled to the 16×16 grid the way the reed encoder module does it
    (timm's antialiased bicubic); torch-hub DINOv2 (EDM2) uses non-antialiased bicubic with a 0.1 offset, so values
    are close to but not bit-identical with EDM2's.
    """
    dev = pick_device(device)
    encoder = encoder.to(dev)
    pooling = _dinov2_pooling(encoder)
    reader = _ImageReader(images)
    feats: list[np.ndarray] = []
    total = math.ceil(len(reader) / batch_size)
    with full_fp32():
        for groups in progress_bar(reader.batches(batch_size, num_workers), progress, "dinov2", total=total,
                                  unit="batch"):
            for g in groups:
                x = torch.from_numpy(g).to(dev).permute(0, 3, 1, 2)
                feats.append(_dinov2_batch(encoder, x, pooling).cpu().numpy())
    return np.concatenate(feats).astype(np.float32, copy=False)


# ================================================================================================ statistics


_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"), "dinov2": ("dinov2_mu", "dinov2_sigma")}


def _gaussian(x: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a statistics dict, a features dict, or a feature matrix ``(N, D)``."""
    mu_key, sigma_key = _KEYS[kind]
    if isinstance(x, Mapping):
        if x.get(mu_key) is not None and x.get(sigma_key) is not None:
            return np.asarray(x[mu_key], np.float64), np.asarray(x[sigma_key], np.float64)
        if x.get(kind) is not None:
            return feature_stats(x[kind])
        raise DataError(f"no '{kind}' statistics ({mu_key}/{sigma_key}) or features ('{kind}') in {sorted(x)}")
    arr = np.asarray(x)
    if arr.ndim == 2:
        return feature_stats(arr)
    raise DataError(f"expected statistics, a features dict or an (N, D) feature matrix, got shape {arr.shape}")


def fid(samples: Any, reference: Any) -> float:
    """FID: Fréchet distance of ``pool_3`` Gaussians.

    Each argument is a dict with ``mu`` (2048,) and ``sigma`` (2048, 2048) (ADM / :func:`reference_statistics`
    layout), a features dict with ``pool`` (N, 2048) (:func:`compute_features`), or a feature matrix (N, 2048).
    """
    return frechet_distance(*_gaussian(samples, "pool"), *_gaussian(reference, "pool"))


def sfid(samples: Any, reference: Any) -> float:
    """sFID: Fréchet distance of ``mixed_6/conv`` Gaussians (``mu_s`` (2023,) / ``sigma_s``, or ``spatial``
    features (N, 2023), or a feature matrix)."""
    return frechet_distance(*_gaussian(samples, "spatial"), *_gaussian(reference, "spatial"))


def _inception_score_splits(logits: np.ndarray, splits: int) -> list[float]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or len(z) < splits or splits < 1:
        raise DataError(f"inception_score needs logits (N, K) with N >= splits={splits}, got shape {z.shape}")
    zmax = z.max(axis=1, keepdims=True)
    logp = z - (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))  # log softmax
    scores = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for part in np.array_split(logp, splits):
            p = np.exp(part)
            log_py = np.log(p.mean(axis=0, keepdims=True))
            kl = np.where(p > 0, p * (part - log_py), 0.0).sum(axis=1)
            scores.append(float(np.exp(kl.mean())))
    return scores


def inception_score(logits: np.ndarray, splits: int = 10) -> float:
    """Inception Score as in ADM: mean over ``splits`` contiguous chunks of ``exp(mean_x KL(p(y|x) || p(y)))``.

    Args:
        logits: ``(N, K)`` Inception logits (``compute_features(...)["logits"]``: ``pool_3 @ W``, K = 1008).
            ``p(y|x)`` is their softmax (computed in float64); ``p(y)`` is the mean of ``p(y|x)`` over the chunk.
        splits: number of chunks (``np.array_split``, no shuffling). ADM uses chunks of 5,000, i.e. 10 chunks
            for 50,000 samples.

    Returns:
        The mean over chunks (uniform predictions give 1; confident predictions spread evenly over C classes give C).
    """
    return float(np.mean(_inception_score_splits(logits, splits)))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(len(a), len(b))`` as ADM computes them: ``|a|² − 2ab + |b|²`` clamped at 0."""
    na = (a * a).sum(1, keepdim=True)
    nb = (b * b).sum(1).unsqueeze(0)
    return (na - 2.0 * (a @ b.T) + nb).clamp_min_(0.0)


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour, not counting itself (ADM: sorted index k)."""
    radii = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for i in range(0, len(x), batch_size):
        d = torch.cat([_sq_dists(x[i : i + batch_size], x[j : j + batch_size]) for j in range(0, len(x), batch_size)],
                      dim=1)
        radii[i : i + batch_size] = d.kthvalue(k + 1, dim=1).values
    return radii


def _fraction_inside(query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``query`` rows within ``ref_radii[j]`` (squared) of some ``ref[j]``."""
    inside = torch.zeros(len(query), dtype=torch.bool, device=query.device)
    for i in range(0, len(query), batch_size):
        q = query[i : i + batch_size]
        for j in range(0, len(ref), batch_size):
            d = _sq_dists(q, ref[j : j + batch_size])
            inside[i : i + batch_size] |= (d <= ref_radii[j : j + batch_size].unsqueeze(0)).any(dim=1)
    return float(inside.float().mean().item())


def precision_recall(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    k: int = 3,
    *,
    batch_size: int = 10_000,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as in ADM's ``ManifoldEstimator``.

    Args:
        real_feats: reference features ``(N_r, D)`` (``pool_3`` of the reference images).
        fake_feats: sample features ``(N_f, D)``.
        k: neighbourhood size: the radius of each point's ball is the distance to its k-th nearest neighbour in its
            own set (ADM: 3).
        batch_size: rows / columns per block of the pairwise-distance computation (memory ~ batch_size × N × 4 B).
        device: ``None`` = CUDA if available, else CPU. Distances are float32 (TF32 off).

    Returns:
        ``(precision, recall)``: the fraction of samples inside the real manifold, and of real points inside the
        sample manifold (a point on a ball's boundary counts as inside).
    """
    real = np.asarray(real_feats, dtype=np.float32)
    fake = np.asarray(fake_feats, dtype=np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DataError(f"precision_recall needs (N, D) feature matrices of equal D, got {real.shape} and {fake.shape}")
    if min(len(real), len(fake)) <= k:
        raise DataError(f"precision_recall with k={k} needs more than {k} points per set, got {len(real)} real and "
                        f"{len(fake)} fake")
    dev = pick_device(device)
    with full_fp32():
        r = torch.tensor(real, device=dev)
        f = torch.tensor(fake, device=dev)
        radii_r = _knn_radii(r, k, batch_size)
        radii_f = _knn_radii(f, k, batch_size)
        precision = _fraction_inside(f, r, radii_r, batch_size)
        recall = _fraction_inside(r, f, radii_f, batch_size)
    return precision, recall


# ================================================================================================ references


def _cache_file(cache_dir: str | os.PathLike | None, kind: str, src_fp: str, net_fp: str, prep: str) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha256(f"v{_CACHE_VERSION}|{kind}|{src_fp}|{net_fp}|{prep}".encode()).hexdigest()[:24]
    return Path(cache_dir).expanduser() / "fid_refs" / f"{kind}-{key}.npz"


def _save_cache(path: Path, arrays: dict[str, np.ndarray | None], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in arrays.items() if v is not None}
    data["meta"] = np.array(json.dumps(meta))
    atomic_savez(path, data)


def _load_cache(path: Path | None, expect: dict[str, Any]) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out: dict[str, Any] = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"]))
    except Exception:  # a corrupt / partial cache file is recomputed
        return None
    if any(meta.get(k) != v for k, v in expect.items()):
        return None
    out.update(meta)
    return out


def _inception_reference(
    source: Any,
    net: FIDInceptionV3,
    *,
    cache_dir: str | os.PathLike | None,
    batch_size: int,
    device: torch.device,
    need_features: bool,
    progress: bool,
    src_fp: str | None = None,
) -> dict[str, Any]:
    if isinstance(source, Mapping):  # precomputed statistics
        out = dict(source)
        out.setdefault("stats_origin", "given")
        out.setdefault("pool", None)
        return out
    adm_keys: set[str] = set()
    path = None if isinstance(source, np.ndarray) else Path(source).expanduser()
    if path is not None and path.is_file() and path.suffix == ".npz":
        adm_keys = _npz_keys(path)
    src_fp = src_fp or source_fingerprint(source)
    cache = _cache_file(cache_dir, "inception", src_fp, net.fingerprint, PREPROCESSING)
    expect = {"source_fingerprint": src_fp, "network_fingerprint": net.fingerprint, "cache_version": _CACHE_VERSION}
    cached = _load_cache(cache, expect)
    if cached is not None and (not need_features or "pool" in cached or not cached.get("has_images", True)):
        cached.setdefault("pool", None)
        for key in ("mu_s", "sigma_s"):
            cached.setdefault(key, None)
        cached.update(from_cache=True, cache_file=str(cache))
        return cached

    arrays: dict[str, np.ndarray | None] = {}
    has_images = path is None or not adm_keys or "arr_0" in adm_keys
    if "mu" in adm_keys:  # ADM reference batch: use its precomputed (TF) statistics, as ADM's evaluator does
        with np.load(path) as z:
            for key in ("mu", "sigma", "mu_s", "sigma_s"):
                arrays[key] = np.asarray(z[key], np.float64) if key in z.files else None
        origin = "npz statistics (mu/sigma" + ("/mu_s/sigma_s" if arrays["mu_s"] is not None else "") + ")"
        wanted = (["pool"] if need_features else []) + (["spatial"] if arrays["mu_s"] is None else [])
        arrays["pool"] = None
        if has_images and wanted:
            feats = compute_features(source, inception=net, batch_size=batch_size, device=device, outputs=wanted,
                                     progress=progress)
            arrays["pool"] = feats.get("pool")
            if "spatial" in feats:
                arrays["mu_s"], arrays["sigma_s"] = feature_stats(feats["spatial"])
                origin += "; mu_s/sigma_s computed from arr_0"
        num_images = _ImageReader(source).n if has_images else None
    else:
        if not has_images:
            raise DataError(f"reference {path} has neither statistics (mu, sigma) nor images (arr_0)")
        feats = compute_features(source, inception=net, batch_size=batch_size, device=device,
                                 outputs=("pool", "spatial"), progress=progress)
        arrays["mu"], arrays["sigma"] = feature_stats(feats["pool"])
        arrays["mu_s"], arrays["sigma_s"] = feature_stats(feats["spatial"])
        arrays["pool"] = feats["pool"]
        origin = "computed from images"
        num_images = len(feats["pool"])
    meta = dict(expect, source=_describe(source), stats_origin=origin, num_images=num_images, has_images=has_images,
                preprocessing=PREPROCESSING)
    computed_something = arrays.get("pool") is not None or "computed" in origin
    if cache is not None and computed_something:
        _save_cache(cache, arrays, meta)
    return dict(arrays, **meta, from_cache=False, cache_file=str(cache) if cache is not None and computed_something
                else None)


def _dinov2_reference(
    source: Any,
    encoder,
    *,
    cache_dir: str | os.PathLike | None,
    batch_size: int,
    device: torch.device,
    progress: bool,
    src_fp: str | None = None,
) -> dict[str, Any]:
    if isinstance(source, Mapping):
        if source.get("dinov2_mu") is None:
            raise DataError("the given reference statistics hold no DINOv2 statistics (dinov2_mu / dinov2_sigma)")
        return dict(source)
    path = None if isinstance(source, np.ndarray) else Path(source).expanduser()
    if path is not None and path.is_file() and path.suffix == ".npz" and "arr_0" not in _npz_keys(path):
        raise DataError(f"FD_DINOv2 needs reference images, but {path} has no arr_0")
    src_fp = src_fp or source_fingerprint(source)
    pooling = _dinov2_pooling(encoder)
    prep = _dinov2_preprocessing(pooling)
    cache = _cache_file(cache_dir, "dinov2", src_fp, encoder.fingerprint, prep)
    expect = {"source_fingerprint": src_fp, "dinov2_fingerprint": encoder.fingerprint,
              "cache_version": _CACHE_VERSION}
    cached = _load_cache(cache, expect)
    if cached is not None:
        cached.update(from_cache=True, cache_file=str(cache))
        return cached
    feats = dinov2_features(source, encoder, batch_size=batch_size, device=device, progress=progress)
    mu, sigma = feature_stats(feats)
    meta = dict(expect, source=_describe(source), dinov2_num_images=len(feats), dinov2_pooling=pooling,
                dinov2_preprocessing=prep)
    if cache is not None:
        _save_cache(cache, {"dinov2_mu": mu, "dinov2_sigma": sigma}, meta)
    return dict(meta, dinov2_mu=mu, dinov2_sigma=sigma, from_cache=False,
                cache_file=str(cache) if cache is not None else None)


def reference_statistics(
    source: ImageSource | Mapping[str, Any],
    *,
    cache_dir: str | os.PathLike | None = ".cache/reed",
    inception: FIDInceptionV3 | str | os.PathLike | None = None,
    dinov2=None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    features: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Reference statistics for FID / sFID / precision-recall (and FD_DINOv2), cached on disk.

    Args:
        source: an image source (array, ``.npz``, ``.npy``, directory), or an ADM reference batch ``.npz`` holding
            ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (precomputed by ADM with TF — used as they are, as ADM's
            evaluator does) and ``arr_0`` (reference images, used for precision/recall). A dict (an earlier result)
            is returned unchanged.
        cache_dir: results go to ``<cache_dir>/fid_refs/inception-<key>.npz`` where ``key`` hashes the source's
            contents (:func:`source_fingerprint`), the network's weights and the preprocessing; ``None`` disables
            caching. A cache hit skips the network entirely.
        inception: a loaded :class:`FIDInceptionV3`, a weights path, or ``None`` (``$REED_INCEPTION_WEIGHTS``).
        dinov2: optional DINOv2 :class:`~reed.image.targets.encoders.ImageEncoder`, adds ``dinov2_mu`` /
            ``dinov2_sigma`` (cached separately, keyed by the encoder's fingerprint).
        batch_size, device, progress: as in :func:`compute_features`.
        features: also provide the reference ``pool`` features (needed for precision/recall).

    Returns:
        ``{"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)`` (float64),
        ``"pool": (N, 2048) float32 | None, "num_images", "stats_origin", "source", "source_fingerprint",
        "network_fingerprint", "from_cache", "cache_file"}`` (+ ``dinov2_*`` keys when ``dinov2`` is given).
    """
    if isinstance(source, Mapping):
        return dict(source)
    dev = pick_device(device)
    src_fp = source_fingerprint(source)
    net = _as_inception(inception, dev)
    out = _inception_reference(source, net, cache_dir=cache_dir, batch_size=batch_size, device=dev,
                               need_features=features, progress=progress, src_fp=src_fp)
    if dinov2 is not None:
        d = _dinov2_reference(source, dinov2, cache_dir=cache_dir, batch_size=batch_size, device=dev,
                              progress=progress, src_fp=src_fp)
        out.update({k: v for k, v in d.items() if k.startswith("dinov2")})
    return out


def fd_dinov2(
    samples: ImageSource | np.ndarray,
    reference: ImageSource | np.ndarray | Mapping[str, Any],
    encoder,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> float:
    """FD_DINOv2: Fréchet distance between DINOv2 features of samples and reference (EDM2 / dgm-eval).

    Args:
        samples: an image source, or precomputed features ``(N, D)`` (a float 2-D array).
        reference: an image source, precomputed features ``(N, D)``, or statistics with ``dinov2_mu`` /
            ``dinov2_sigma`` (from :func:`reference_statistics` with ``dinov2=``).
        encoder: a DINOv2 :class:`~reed.image.targets.encoders.ImageEncoder`
            (``load_image_encoder("dinov2-vit-l", path)``;
            EDM2 uses ViT-L/14). Features per :func:`dinov2_features`: the CLS token for DINOv2 encoders, the mean
            of the patch tokens for any other encoder.
        cache_dir: cache the reference statistics there (``None``: no caching).
    """
    dev = pick_device(device)

    def stats(x: Any, is_reference: bool) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(x, Mapping):
            return _gaussian(x, "dinov2")
        if isinstance(x, np.ndarray) and x.ndim == 2:
            return feature_stats(x)
        if is_reference:
            ref = _dinov2_reference(x, encoder, cache_dir=cache_dir, batch_size=batch_size, device=dev,
                                    progress=progress)
            return ref["dinov2_mu"], ref["dinov2_sigma"]
        return feature_stats(dinov2_features(x, encoder, batch_size=batch_size, device=dev, progress=progress))

    return frechet_distance(*stats(samples, False), *stats(reference, True))


# ================================================================================================ evaluate


def _normalise_metrics(metrics: Sequence[str] | str) -> list[str]:
    items = [metrics] if isinstance(metrics, str) else list(metrics)
    out: list[str] = []
    for m in items:
        for part in str(m).split(","):
            name = part.strip().lower()
            if not name:
                continue
            name = _ALIASES.get(name, name)
            if name not in METRICS:
                raise ConfigError(f"unknown metric '{part.strip()}'; choose from {', '.join(METRICS)}")
            if name not in out:
                out.append(name)
    if not out:
        raise ConfigError("no metrics requested")
    return out


def _as_dinov2(dinov2, name: str, device: torch.device):
    if dinov2 is None or hasattr(dinov2, "fingerprint"):
        return dinov2
    from reed.image.targets.encoders import load_image_encoder

    return load_image_encoder(name, path=dinov2, device=device)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def evaluate(
    samples: ImageSource,
    reference: ImageSource | Mapping[str, Any],
    *,
    inception: FIDInceptionV3 | str | os.PathLike | None = None,
    dinov2=None,
    metrics: Sequence[str] | str = ("fid", "sfid", "is", "pr"),
    batch_size: int = 64,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = ".cache/reed",
    is_splits: int = 10,
    pr_k: int = 3,
    pr_batch_size: int = 10_000,
    dinov2_name: str = "dinov2-vit-l",
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a sample batch against a reference like ADM's evaluator (+ FD_DINOv2); backs ``reed evaluate``.

    Args:
        samples: the generated images: ``SAMPLES.npz`` (``arr_0`` uint8 N×H×W×3, as written by ``reed generate``),
            an array, a ``.npy`` or an image directory.
        reference: ADM's reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``), any image source, or
            statistics from :func:`reference_statistics`.
        inception: a loaded :class:`FIDInceptionV3`, a weights file (``--inception PATH``), or ``None``
            (``$REED_INCEPTION_WEIGHTS``). Not needed when only ``fd_dinov2`` is requested.
        dinov2: a DINOv2 encoder or a local Hugging Face DINOv2 directory (``--dinov2 PATH``, loaded as
            ``dinov2_name``). Giving it adds ``fd_dinov2`` to ``metrics``.
        metrics: any of ``fid``, ``sfid``, ``is``, ``pr``, ``fd_dinov2`` (list or comma-separated string).
        batch_size: images per network forward. cache_dir: reference-statistics cache (``None`` disables it).
        is_splits: Inception-Score chunks. pr_k, pr_batch_size: precision/recall neighbourhood and block size.
        extra: caller's settings (sampler, steps, CFG, guidance interval, EMA, VAE, ...) copied into the result.

    Returns:
        A JSON-serialisable dict: ``metrics`` (``fid``, ``sfid``, ``inception_score``, ``inception_score_std``,
        ``precision``, ``recall``, ``fd_dinov2`` as requested), ``samples`` / ``reference`` (source, count,
        fingerprint, where the reference statistics came from), ``settings`` (every knob: weights file and sha256,
        preprocessing, feature definitions, IS splits, k, DINOv2 model / pooling, device, batch size),
        ``warnings`` (e.g. sample count ≠ 50,000, unofficial weights), ``versions`` and ``created`` (UTC).
    """
    names = _normalise_metrics(metrics)
    if dinov2 is not None and "fd_dinov2" not in names:
        names.append("fd_dinov2")
    dev = pick_device(device)
    warnings: list[str] = []
    result_metrics: dict[str, float] = {}
    settings: dict[str, Any] = {"metrics": names, "batch_size": batch_size, "device": str(dev),
                                "cache_dir": str(cache_dir) if cache_dir is not None else None}
    samples_info: dict[str, Any] = {"source": _describe(samples)}
    reference_info: dict[str, Any] = {"source": _describe(reference)}

    n_samples = len(_ImageReader(samples))  # checks dtype / layout (npz: header only) before any network runs
    if n_samples < 2:
        raise DataError(f"{_describe(samples)} holds {n_samples} image(s); scoring needs at least 2 (FID fits a "
                        "covariance)")
    sample_fp = None if isinstance(samples, np.ndarray) else source_fingerprint(samples)
    samples_info["fingerprint"] = sample_fp
    needs_reference = any(m in names for m in ("fid", "sfid", "pr", "fd_dinov2"))
    ref_fp = None if isinstance(reference, Mapping) or not needs_reference else source_fingerprint(reference)
    reference_info["fingerprint"] = ref_fp

    inception_metrics = [m for m in names if m in ("fid", "sfid", "is", "pr")]
    if inception_metrics:
        net = _as_inception(inception, dev)
        settings["inception"] = {
            "network": "Inception-v3, TF graph 2015-12-05 (classify_image_graph_def.pb), PyTorch port",
            "weights": net.weights_path, "sha256": net.file_sha256, "official_weights": net.official,
            "fingerprint": net.fingerprint, "num_classes": net.num_classes, "preprocessing": PREPROCESSING,
            "pool": "pool_3 (2048)",
            "spatial": "mixed_6/conv = Mixed_6d.branch1x1 after BN+ReLU, channels [:7] of 17x17, (h,w,c) flatten",
            "logits": "pool_3 @ softmax/weights, no bias (ADM)", "tf32": False,
        }
        if not net.official:
            warnings.append(f"Inception weights {net.weights_path} are not the published FID weights (sha256 "
                            f"{net.file_sha256}); numbers are not comparable to published FID/IS")
        outputs = [o for o, ms in (("pool", ("fid", "pr")), ("spatial", ("sfid",)), ("logits", ("is",)))
                   if any(m in ms for m in inception_metrics)]
        feats = compute_features(samples, inception=net, batch_size=batch_size, device=dev, outputs=outputs,
                                 progress=progress)
        n = len(next(iter(feats.values())))
        samples_info["num_images"] = n
        if n != FID_PROTOCOL_SAMPLES:
            warnings.append(f"{n} samples: published FID/sFID/IS/precision/recall use {FID_PROTOCOL_SAMPLES:,} "
                            "(FID-50K); FID is biased upward for fewer samples, so compare only at equal N")
        ref: dict[str, Any] = {}
        if any(m in inception_metrics for m in ("fid", "sfid", "pr")):
            ref = _inception_reference(reference, net, cache_dir=cache_dir, batch_size=batch_size, device=dev,
                                       need_features="pr" in inception_metrics, progress=progress, src_fp=ref_fp)
            reference_info.update(num_images=ref.get("num_images"), stats_origin=ref.get("stats_origin"),
                                  cache_file=ref.get("cache_file"), from_cache=ref.get("from_cache"))
            if "npz statistics" not in str(ref.get("stats_origin")):
                warnings.append("reference statistics were computed by this PyTorch port; published ImageNet-256 "
                                "numbers use ADM's precomputed VIRTUAL_imagenet256_labeled.npz statistics")
        if "fid" in inception_metrics:
            result_metrics["fid"] = fid(feats, ref)
        if "sfid" in inception_metrics:
            if ref.get("mu_s") is None:
                raise DataError(f"sFID: reference {reference_info['source']} has no spatial statistics "
                                "(mu_s/sigma_s) and no images to compute them from")
            result_metrics["sfid"] = sfid(feats, ref)
        if "is" in inception_metrics:
            per_split = _inception_score_splits(feats["logits"], is_splits)
            result_metrics["inception_score"] = float(np.mean(per_split))
            result_metrics["inception_score_std"] = float(np.std(per_split))
            settings["inception_score"] = {"splits": is_splits, "split": "np.array_split, contiguous, no shuffle",
                                           "formula": "mean_splits exp(E_x KL(softmax(logits) || mean softmax))"}
        if "pr" in inception_metrics:
            if ref.get("pool") is None:
                raise DataError(f"precision/recall need reference images (arr_0 / an image source), but reference "
                                f"{reference_info['source']} provides only statistics")
            p, r = precision_recall(ref["pool"], feats["pool"], k=pr_k, batch_size=pr_batch_size, device=dev)
            result_metrics["precision"], result_metrics["recall"] = p, r
            reference_info["pr_num_images"] = len(ref["pool"])
            settings["precision_recall"] = {"k": pr_k, "features": "pool_3", "distance": "squared L2, float32",
                                            "reference_features": f"{len(ref['pool'])} reference images"}

    if "fd_dinov2" in names:
        if dinov2 is None:
            raise ConfigError("fd_dinov2 needs a DINOv2 encoder: pass dinov2= (an encoder or a local Hugging Face "
                              "DINOv2 directory, --dinov2 PATH)")
        enc = _as_dinov2(dinov2, dinov2_name, dev)
        pooling = _dinov2_pooling(enc)
        dref = _dinov2_reference(reference, enc, cache_dir=cache_dir, batch_size=batch_size, device=dev,
                                 progress=progress, src_fp=ref_fp)
        sfeats = dinov2_features(samples, enc, batch_size=batch_size, device=dev, progress=progress)
        samples_info.setdefault("num_images", len(sfeats))
        result_metrics["fd_dinov2"] = frechet_distance(*feature_stats(sfeats), dref["dinov2_mu"], dref["dinov2_sigma"])
        reference_info["dinov2_num_images"] = dref.get("dinov2_num_images")
        settings["fd_dinov2"] = {
            "encoder": enc.name, "weights": str(dinov2) if not hasattr(dinov2, "fingerprint") else None,
            "fingerprint": enc.fingerprint, "feature_dim": int(sfeats.shape[1]), "pooling": pooling,
            "preprocessing": _dinov2_preprocessing(pooling),
        }
        if enc.name.lower() != "dinov2-vit-l":
            warnings.append(f"FD_DINOv2 with {enc.name}: EDM2 / dgm-eval use DINOv2 ViT-L/14 (dinov2-vit-l)")

    return _jsonable({
        "metrics": result_metrics,
        "samples": samples_info,
        "reference": reference_info,
        "settings": settings,
        "protocol": "ADM evaluation suite (guided-diffusion/evaluations) ported to PyTorch; FD_DINOv2 after EDM2",
        "warnings": warnings,
        "extra": dict(extra or {}),
        "versions": {"reed": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "scipy": scipy.__version__, "python": platform.python_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
