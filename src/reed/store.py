"""Precomputed target store: a target source computed once over a data set, sharded and memory-mappable.

Layout of a store directory::

    manifest.json   {"kind": "reed.targets", "version": 1, "source": ..., "weights_fingerprint": ...,
                     "preprocessing": {...}, "shape": [T, D] or [D], "dtype": "float16"|"float32", "count": N,
                     "dataset_fingerprint": ..., "shard_size": S, "shards": [{"index", "count", "file"}]}
    z_00000.npy     (n, T, D) or (n, D) rows [i*S, (i+1)*S) of the data set, in data-set order

Shards are written atomically (temp name + rename) and a finished shard is never recomputed, so an interrupted
``reed embed`` resumes without duplicates or gaps; shard i belongs to process ``i % num_processes`` under
``accelerate launch``. The manifest is written last, once every shard exists. Opening a store validates the
manifest, the count and dims against what the run expects, the fingerprints, and scans for NaN/inf.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from reed.errors import DataError
from reed.io import atomic_save_npy, atomic_write_json

KIND = "reed.targets"
VERSION = 1
_FULL_SCAN_BYTES = 2 << 30  # stores up to 2 GiB are scanned fully for NaN on open; larger ones per shard edge rows


def shard_file(i: int) -> str:
    return f"z_{i:05d}.npy"


class TargetStoreWriter:
    """Write a store shard by shard. ``compute(indices) -> (len, *shape)`` produces the rows of a batch."""

    def __init__(self, directory: str | Path, *, source: str, count: int, shape: Sequence[int], dtype: str = "float16",
                 shard_size: int = 10_000, weights_fingerprint: str = "", dataset_fingerprint: str = "",
                 preprocessing: dict[str, Any] | None = None):
        if dtype not in ("float16", "float32"):
            raise DataError(f"target store dtype must be float16 or float32, got {dtype!r}")
        self.dir = Path(directory)
        self.meta = {"kind": KIND, "version": VERSION, "source": source, "weights_fingerprint": weights_fingerprint,
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
        np_dtype = np.float16 if self.meta["dtype"] == "float16" else np.float32
        for i in todo:
            rows = np.arange(self.shard_range(i).start, self.shard_range(i).stop)
            chunks = []
            for j in range(0, len(rows), batch_size):
                z = compute(rows[j : j + batch_size])
                z = z.detach().float().cpu().numpy() if torch.is_tensor(z) else np.asarray(z, dtype=np.float32)
                if z.shape[1:] != tuple(self.meta["shape"]):
                    raise DataError(f"target source '{self.meta['source']}' produced rows of shape {z.shape[1:]}, "
                                    f"expected {tuple(self.meta['shape'])}")
                if not np.isfinite(z).all():
                    raise DataError(f"target source '{self.meta['source']}' produced NaN/inf for examples "
                                    f"{rows[j]}..{rows[j] + len(z) - 1}; nothing was written for shard {i}")
                chunks.append(z.astype(np_dtype))
                bar.update(len(z))
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
        if self.meta.get("kind") != KIND or self.meta.get("version") != VERSION:
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
        self.shards: list[np.ndarray] = []
        total = 0
        for sh in self.meta["shards"]:
            p = self.dir / sh["file"]
            if not p.is_file():
                raise DataError(f"target store shard missing: {p}")
            try:
                arr = np.load(p, mmap_mode="r")
            except Exception as e:  # noqa: BLE001
                raise DataError(f"target store shard {p} is corrupt ({e})") from None
            if arr.shape != (sh["count"], *self.shape):
                raise DataError(f"target store shard {p} has shape {arr.shape}, manifest says "
                                f"{(sh['count'], *self.shape)}")
            self.shards.append(arr)
            total += arr.shape[0]
        if total != self.count:
            raise DataError(f"target store {self.dir}: shards hold {total} rows, manifest says {self.count}")
        if scan:
            self._scan()

    def _scan(self) -> None:
        full = sum(a.nbytes for a in self.shards) <= _FULL_SCAN_BYTES
        for i, a in enumerate(self.shards):
            part = a if full else np.concatenate([a[:64], a[-64:]])
            if not np.isfinite(part).all():
                raise DataError(f"target store {self.dir}: shard {shard_file(i)} contains NaN or inf")

    @property
    def dim(self) -> int:
        return int(self.shape[-1])

    def __len__(self) -> int:
        return self.count

    def get(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows for global ``indices`` as float32 (len, *shape)."""
        idx = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64)
        out = np.empty((len(idx), *self.shape), dtype=np.float32)
        shard, off = np.divmod(idx, self.shard_size)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards[int(s)][np.sort(off[sel])][np.argsort(np.argsort(off[sel]))]
        return torch.from_numpy(out)
