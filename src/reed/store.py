"""Precomputed target store: a target source computed once over a data set, sharded and memory-mappable.

Layout of a store directory::

    manifest.json   {"kind": "reed.targets", "version": 1 (2 for bfloat16 / int8), "source": ...,
                     "weights_fingerprint": ..., "preprocessing": {...}, "shape": [T, D] or [D],
                     "dtype": "float16"|"float32"|"bfloat16"|"int8", "count": N,
                     "dataset_fingerprint": ..., "shard_size": S, "shards": [{"index", "count", "file"}]}
    z_00000.npy     (n, T, D) or (n, D) rows [i*S, (i+1)*S) of the data set, in data-set order
    s_00000.npy     int8 stores only: (n, T) or (n,) float32 scale of each vector (its max |value| / 127)

Storage dtypes (:data:`STORE_DTYPES`; bytes per value): ``float32`` (4), ``float16`` (2, overflows above 65504),
``bfloat16`` (2, float32's range with 8 significant bits; saved as int16 bits), ``int8`` (1 + 4/D: each target
vector quantised to round(127 v / max|v|) with its scale; the cosine of alignment is scale-free, and the relative
error of a component is at most 1/254 of the vector's largest one). The ImageNet DINOv2-B token target (1.28M x 256
x 768) is 1007 GB in float32, 503 GB in float16 or bfloat16, 253 GB in int8 (its scales included). Readers get float32
(:meth:`TargetStore.get`) or the stored values and scales (:meth:`TargetStore.get_stored`, which a training batch
copies to the device before :func:`dequantize`, halving or quartering the bytes copied).

Shards are written atomically (temp name + rename) and a finished shard is never recomputed, so an interrupted
``reed embed`` resumes without duplicates or gaps; shard i belongs to process ``i % num_processes`` under
``accelerate launch``. The manifest is written last, once every shard exists. Opening a store validates the
manifest, the count and dims against what the run expects, the fingerprints, and scans the values
(:func:`check_target_values`).

Target values
-------------
Alignment compares a projection with each target vector (the last dim of a row) by cosine, normalised in fp32
(:func:`reed.align.negative_cosine`). :func:`check_target_values` is the one check of target values, for every
domain: it refuses NaN/inf, vectors whose fp32 norm overflows (values ≳ 1.8e19 / sqrt(D), about 1e18 for D = 384:
the cosine would silently be 0) and a target whose vectors all have zero (or < 1e-12) norm, and warns with their
count when only some do (the cosine of a zero vector is undefined; it counts as 0, i.e. no guidance for that
example / token). The writer also checks the values after the cast to the store's dtype (float16 overflows above
65504).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from reed.errors import DataError
from reed.io import atomic_save_npy, atomic_write_json

KIND = "reed.targets"
STORE_DTYPES = ("float16", "float32", "bfloat16", "int8")
#: version 1: float16 / float32 stores (readable by every reed); 2: bfloat16 (int16 bits) and int8 (+ scales), which
#: a reader of version 1 alone would misread, so it refuses them by the version
VERSIONS = (1, 2)
VERSION = 1
_FULL_SCAN_BYTES = 2 << 30  # stores up to 2 GiB are scanned fully for NaN on open; larger ones per shard edge rows


def shard_file(i: int) -> str:
    return f"z_{i:05d}.npy"


def scale_file(i: int) -> str:
    return f"s_{i:05d}.npy"


def quantize(z: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 rows (n, ..., D) -> (stored values, int8's per-vector scales (n, ...) or None)."""
    if dtype == "int8":
        amax = np.abs(z).max(axis=-1)
        scale = (amax / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)[..., None]
        return np.clip(np.rint(z / safe), -127, 127).astype(np.int8), scale
    if dtype == "bfloat16":  # round to nearest even in torch, keep the 16 bits as int16 (numpy has no bfloat16)
        return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(torch.bfloat16).view(
            torch.int16).numpy(), None
    with np.errstate(over="ignore"):  # float16 overflow is refused by the writer, with the numbers
        return z.astype(np.float16 if dtype == "float16" else np.float32), None


def stored_tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values as a tensor of their dtype (bfloat16 from its int16 bits)."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def dequantize(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 rows from :meth:`TargetStore.get_stored`'s values (and int8 scales), on their device."""
    z = values.float()
    return z * scale.float().unsqueeze(-1) if scale is not None else z


#: ``F.normalize``'s eps in :func:`reed.align.negative_cosine`: a target vector with a smaller fp32 norm is not
#: scaled to unit length (a zero vector gives cosine 0, no alignment signal).
COSINE_EPS = 1e-12
_CHECK_CHUNK_BYTES = 64 << 20  # values are checked in chunks of rows of about this many fp32 bytes


def target_vector_counts(z: np.ndarray | torch.Tensor, what: str) -> tuple[int, int]:
    """(number of target vectors, number of them with fp32 norm < :data:`COSINE_EPS`) of values ``z`` (N, ..., D).

    A vector is a slice along the last dim (per example for pooled targets, per token / atom / pair otherwise).
    Raises :class:`DataError` naming ``what`` for an empty last dim, NaN/inf values, or a vector whose fp32 norm
    overflows (the alignment cosine would silently be 0). Reads memory-mapped arrays in chunks of rows."""
    if z.ndim == 0 or z.shape[-1] == 0:
        raise DataError(f"{what} has shape {tuple(z.shape)}: target vectors need a non-empty last dimension")
    row = int(np.prod(z.shape[1:])) * 4
    step = max(1, _CHECK_CHUNK_BYTES // max(row, 1))
    total = small = 0
    for i in range(0, len(z), step):
        c = z[i : i + step]
        c = c.float() if torch.is_tensor(c) else torch.from_numpy(np.array(c, dtype=np.float32))  # a copy
        if not torch.isfinite(c).all():
            raise DataError(f"{what} contains NaN or inf")
        norm = torch.linalg.vector_norm(c, dim=-1)  # in fp32, as the alignment loss computes it
        if torch.isinf(norm).any():
            raise DataError(f"{what} has values up to {c.abs().max().item():.3g}: the fp32 norm of a target vector "
                            "overflows, so its alignment cosine would be 0; rescale the target (e.g. divide it by a "
                            "constant)")
        total += norm.numel()
        small += int((norm < COSINE_EPS).sum())
    return total, small


def check_zero_vectors(total: int, small: int, what: str, *, refuse_all: bool = True) -> None:
    """Refuse a target whose ``total`` vectors all have (near-)zero norm (only warn when not ``refuse_all``, e.g. for
    a sample of a store's rows); warn when ``small`` of them do."""
    if total and small == total and refuse_all:
        raise DataError(f"{what}: all {total} target vectors have zero (< {COSINE_EPS:g}) norm, so the alignment "
                        "cosine is undefined; check how the target was computed (or rescale it)")
    if small:
        warnings.warn(f"{what}: {small} of {total} target vectors have zero (< {COSINE_EPS:g}) norm; their alignment "
                      "cosine is undefined and counts as 0 (no guidance from them)", stacklevel=3)


def check_target_values(z: np.ndarray | torch.Tensor, what: str) -> int:
    """Check target values ``z`` (N, ..., D) for cosine alignment (:func:`target_vector_counts`,
    :func:`check_zero_vectors`); ``what`` names the target in the messages. Returns the number of zero vectors."""
    total, small = target_vector_counts(z, what)
    check_zero_vectors(total, small, what)
    return small


class TargetStoreWriter:
    """Write a store shard by shard. ``compute(indices) -> (len, *shape)`` produces the rows of a batch."""

    def __init__(self, directory: str | Path, *, source: str, count: int, shape: Sequence[int], dtype: str = "float16",
                 shard_size: int = 10_000, weights_fingerprint: str = "", dataset_fingerprint: str = "",
                 preprocessing: dict[str, Any] | None = None):
        if dtype not in STORE_DTYPES:
            raise DataError(f"target store dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
        self.dir = Path(directory)
        version = 2 if dtype in ("bfloat16", "int8") else VERSION
        self.meta = {"kind": KIND, "version": version, "source": source, "weights_fingerprint": weights_fingerprint,
                     "preprocessing": preprocessing or {}, "shape": [int(s) for s in shape], "dtype": dtype,
                     "count": int(count), "dataset_fingerprint": dataset_fingerprint, "shard_size": int(shard_size)}
        self.num_shards = (count + shard_size - 1) // shard_size
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = self.dir / "spec.json"  # what this directory is being filled with; a different job must not mix in
        if spec.is_file():
            old = json.loads(spec.read_text())
            diff = [k for k in self.meta if old.get(k) != self.meta[k]]
            if diff:
                raise DataError(f"target store {self.dir} was started for a different job (differs in {diff}); "
                                "use another directory or delete it")
        else:
            atomic_write_json(spec, self.meta, indent=1)

    def shard_range(self, i: int) -> range:
        s = self.meta["shard_size"]
        return range(i * s, min((i + 1) * s, self.meta["count"]))

    def done(self, i: int) -> bool:
        p = self.dir / shard_file(i)
        if not p.is_file():
            return False
        try:
            arr = np.load(p, mmap_mode="r")
            if self.meta["dtype"] == "int8":
                sc = np.load(self.dir / scale_file(i), mmap_mode="r")
                if sc.shape != (len(self.shard_range(i)), *self.meta["shape"][:-1]):
                    return False
        except Exception:  # noqa: BLE001 - an unreadable shard is simply redone
            return False
        return arr.shape == (len(self.shard_range(i)), *self.meta["shape"])

    def write(self, compute: Callable[[np.ndarray], np.ndarray | torch.Tensor], *, batch_size: int = 256,
              process_index: int = 0, num_processes: int = 1, progress: bool = True) -> dict[str, int]:
        """Compute this process's missing shards; returns counts of shards written / skipped."""
        mine = [i for i in range(self.num_shards) if i % num_processes == process_index]
        todo = [i for i in mine if not self.done(i)]
        bar = tqdm(total=sum(len(self.shard_range(i)) for i in todo), disable=not progress, desc="embed",
                   dynamic_ncols=True)
        dtype = self.meta["dtype"]
        for i in todo:
            rows = np.arange(self.shard_range(i).start, self.shard_range(i).stop)
            chunks, scales = [], []
            for j in range(0, len(rows), batch_size):
                z = compute(rows[j : j + batch_size])
                z = z.detach().float().cpu().numpy() if torch.is_tensor(z) else np.asarray(z, dtype=np.float32)
                if z.shape[1:] != tuple(self.meta["shape"]):
                    raise DataError(f"target source '{self.meta['source']}' produced rows of shape {z.shape[1:]}, "
                                    f"expected {tuple(self.meta['shape'])}")
                if not np.isfinite(z).all():
                    raise DataError(f"target source '{self.meta['source']}' produced NaN/inf for examples "
                                    f"{rows[j]}..{rows[j] + len(z) - 1}; nothing was written for shard {i}")
                stored, scale = quantize(z, dtype)
                as_stored = stored_tensor(stored, dtype)
                back = dequantize(as_stored, None if scale is None else torch.from_numpy(scale))
                if not torch.isfinite(back).all():  # only a float type's range can be exceeded
                    top = torch.finfo(as_stored.dtype).max
                    raise DataError(f"target source '{self.meta['source']}' produced values up to "
                                    f"{np.abs(z).max():.3g} for examples {rows[j]}..{rows[j] + len(z) - 1}, beyond "
                                    f"the {dtype} range ({top:.5g}); write the store with --dtype float32 (or "
                                    "bfloat16) or rescale the target")
                target_vector_counts(back, f"target source '{self.meta['source']}' (examples {rows[j]}.."
                                     f"{rows[j] + len(z) - 1})")
                chunks.append(stored)
                scales.append(scale)
                bar.update(len(z))
            if dtype == "int8":  # the scales first: a values file without its scales is redone
                atomic_save_npy(self.dir / scale_file(i), np.concatenate(scales))
            atomic_save_npy(self.dir / shard_file(i), np.concatenate(chunks))
        bar.close()
        return {"written": len(todo), "skipped": len(mine) - len(todo)}

    def finalize(self) -> Path:
        """Write the manifest once all shards exist (call from one process after all have finished)."""
        missing = [i for i in range(self.num_shards) if not self.done(i)]
        if missing:
            raise DataError(f"target store {self.dir} is incomplete: shards {missing[:10]} missing; rerun `reed embed`")
        meta = dict(self.meta)
        meta["shards"] = [{"index": i, "count": len(self.shard_range(i)), "file": shard_file(i)}
                          for i in range(self.num_shards)]
        atomic_write_json(self.dir / "manifest.json", meta, indent=1)
        return self.dir / "manifest.json"


class TargetStore:
    """Read side: memory-mapped rows by global index, validated on open.

    ``expect_count`` / ``expect_dim`` / ``expect_dataset`` are checked when given; the error names the store.
    """

    def __init__(self, directory: str | Path, *, expect_count: int | None = None, expect_dim: int | None = None,
                 expect_dataset: str | None = None, scan: bool = True):
        self.dir = Path(directory)
        man = self.dir / "manifest.json"
        if not man.is_file():
            hint = " (an unfinished `reed embed`? rerun it to complete)" if (self.dir / "spec.json").is_file() else ""
            raise DataError(f"target store manifest not found: {man}{hint}")
        try:
            self.meta = json.loads(man.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"target store manifest {man} is corrupt ({e})") from None
        if self.meta.get("kind") != KIND or self.meta.get("version") not in VERSIONS:
            raise DataError(f"{man} is not a reed target store (kind {self.meta.get('kind')!r}, "
                            f"version {self.meta.get('version')!r})")
        self.count = int(self.meta["count"])
        self.shape = tuple(self.meta["shape"])
        self.shard_size = int(self.meta["shard_size"])
        if expect_count is not None and self.count != expect_count:
            raise DataError(f"target store {self.dir} has {self.count} rows but the data set has {expect_count} "
                            "examples")
        if expect_dim is not None and self.shape[-1] != expect_dim:
            raise DataError(f"target store {self.dir} has dimension {self.shape[-1]}, expected {expect_dim}")
        stored_fp = self.meta.get("dataset_fingerprint")
        if expect_dataset and stored_fp and stored_fp != expect_dataset:
            raise DataError(f"target store {self.dir} was computed for a different data set (fingerprint "
                            f"{self.meta['dataset_fingerprint']} != {expect_dataset})")
        self.dtype = self.meta.get("dtype", "float16")
        if self.dtype not in STORE_DTYPES:
            raise DataError(f"target store {self.dir} has dtype {self.dtype!r}; this reed reads "
                            f"{', '.join(STORE_DTYPES)}")
        self.shards: list[np.ndarray] = []
        self.scales: list[np.ndarray] = []  # int8 stores: (n, *shape[:-1]) per shard
        total = 0
        for sh in self.meta["shards"]:
            p = self.dir / sh["file"]
            files = [(p, (sh["count"], *self.shape))]
            if self.dtype == "int8":
                files.append((self.dir / scale_file(sh["index"]), (sh["count"], *self.shape[:-1])))
            for k, (f, want) in enumerate(files):
                if not f.is_file():
                    raise DataError(f"target store shard missing: {f}")
                try:
                    arr = np.load(f, mmap_mode="r")
                except Exception as e:  # noqa: BLE001
                    raise DataError(f"target store shard {f} is corrupt ({e})") from None
                if arr.shape != want:
                    raise DataError(f"target store shard {f} has shape {arr.shape}, manifest says {want}")
                (self.shards if k == 0 else self.scales).append(arr)
            total += sh["count"]
        if total != self.count:
            raise DataError(f"target store {self.dir}: shards hold {total} rows, manifest says {self.count}")
        if scan:
            self._scan()

    def _float_rows(self, i: int, rows: slice | np.ndarray) -> torch.Tensor:
        """float32 rows of shard ``i``."""
        sc = torch.from_numpy(np.array(self.scales[i][rows])) if self.dtype == "int8" else None
        return dequantize(stored_tensor(np.array(self.shards[i][rows]), self.dtype), sc)

    def _scan(self) -> None:
        """:func:`check_target_values` over every row (stores up to 2 GiB) or the 64 first and last rows per shard."""
        full = sum(a.nbytes for a in self.shards) <= _FULL_SCAN_BYTES
        total = small = 0
        per_row = 4 * int(np.prod(self.shape))  # float32 bytes of one row once dequantised
        chunk = max(1, _CHECK_CHUNK_BYTES // per_row)
        for i, a in enumerate(self.shards):
            if full or len(a) <= 128:  # row chunks: a shard is never copied whole
                parts = [slice(j, j + chunk) for j in range(0, len(a), chunk)]
            else:
                parts = [np.r_[0:64, len(a) - 64 : len(a)]]
            for rows in parts:
                t, s = target_vector_counts(self._float_rows(i, rows),
                                            f"target store {self.dir}: shard {shard_file(i)}")
                total, small = total + t, small + s
        where = f"target store {self.dir}" + ("" if full else " (first and last 64 rows of each shard)")
        check_zero_vectors(total, small, where, refuse_all=full)

    @property
    def dim(self) -> int:
        return int(self.shape[-1])

    def __len__(self) -> int:
        return self.count

    def get(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows for global ``indices`` as float32 (len, *shape)."""
        return dequantize(*self.get_stored(indices))

    def get_stored(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor,
                                                                                          torch.Tensor | None]:
        """Rows for global ``indices`` as stored: (values (len, *shape) in the store's dtype, int8's scales
        (len, *shape[:-1]) or None); :func:`dequantize` turns them into float32 (on the device, after the copy)."""
        idx = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64)
        values = self._gather(self.shards, idx, self.shape)
        scales = self._gather(self.scales, idx, self.shape[:-1]) if self.dtype == "int8" else None
        return stored_tensor(values, self.dtype), None if scales is None else torch.from_numpy(scales)

    def _gather(self, arrays: list[np.ndarray], idx: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty((len(idx), *shape), dtype=arrays[0].dtype)
        shard, off = np.divmod(idx, self.shard_size)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = arrays[int(s)][np.sort(off[sel])][np.argsort(np.argsort(off[sel]))]
        return out
