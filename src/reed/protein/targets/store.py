"""Per-protein alignment targets for protein inverse folding, keyed by example (chain) name.

Each item holds the sequence its targets were computed for and up to three kinds of arrays:

* ``single``    per-residue   ``(L, D)``    (AF3 trunk single 384, or an ESM-2 hidden state)
* ``pair``      pairwise      ``(L, L, D)`` (AF3 trunk pair 128, or ESM-2 attention maps)
* ``structure`` per-residue   ``(L, D)``    (AF3 diffusion-head token activations, 768)

Other kind names are accepted too: 2-D arrays are per-residue, 3-D arrays pairwise.

Layout of a store directory::

    index.json        {"format": "reed-protein-targets", "version": 1, "targets": {kind: D},
                       "items": {name: {"file": "items/<safe>.npz", "length": L, "sequence": seq}}, "meta": {...}}
    items/<safe>.npz  one uncompressed npz per name: for every kind ``<kind>`` (float16) and ``<kind>.scale``
                      (float64 scalar), plus ``__meta__`` (a JSON string: name, sequence, kinds)

Storage precision. Arrays are stored as float16 of ``x * scale`` where ``scale`` is a power of two chosen per
array from its largest magnitude so that ``max|x| * scale`` lies in ``(2**13, 2**14]``. This generalises the
reference's fixed ``x100`` trick for the AF3 structure activations: small-magnitude arrays (e.g. values ~1e-3, which
would otherwise fall into fp16's subnormal range and lose digits) and large ones (which would overflow fp16's 65504)
both use fp16's normal range, so every entry keeps fp16's ~2**-11 relative precision. The scale is a power of two,
so multiplying and dividing by it is exact; :meth:`ProteinTargetStore.get` returns ``float32(x16) / scale``.

Memory (reference bug §9.12: every pair array kept in RAM). The store never loads more than the items asked for:
:meth:`ProteinTargetStore.get` / :meth:`ProteinTargetStore.batch` read one file per example on demand (call them in a
data-loader worker), and a pair array is sliced to the requested window before it is converted to float32.

Sequence check (reference bug §9.10: reps were silently sliced ``[:L]`` by the chain length). A lookup names the
sequence of the training example; it must equal the stored sequence, or occur exactly once as a contiguous substring
of it (e.g. a His-tag-trimmed chain against an AF3 run on the full sequence), in which case that window is returned.
Anything else raises :class:`~reed.errors.DataError` naming the chain and showing both sequences.

Writers are resumable: every item is written atomically (temp file + rename), ``has(name)`` reports what is done,
and a writer opened on an existing directory picks up the items already there (also those of a run that was killed
before :meth:`ProteinTargetWriter.close` wrote the index).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reed.errors import DataError
from reed.io import atomic_savez, atomic_write_text, is_temp_name
from reed.store import check_target_values

FORMAT = "reed-protein-targets"
VERSION = 1
INDEX = "index.json"
ITEMS = "items"
PER_RESIDUE_KINDS = ("single", "structure")
PAIR_KINDS = ("pair",)
_TARGET_EXP = 14  # scaled max magnitude lies in (2**13, 2**14]; fp16 max is 65504 ~ 2**16
_KIND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def short_sequence(seq: str, n: int = 60) -> str:
    return seq if len(seq) <= n else f"{seq[: n // 2]}...{seq[-(n // 2):]} (length {len(seq)})"


def _fp16_scale(max_abs: float) -> float:
    """Power of two s with max_abs * s in (2**13, 2**14]; 1.0 for an all-zero array."""
    if not max_abs > 0:
        return 1.0
    exp = _TARGET_EXP - math.ceil(math.log2(max_abs))
    return float(2.0 ** max(-100, min(100, exp)))


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:120]
    if safe != name or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return safe


def _read_item_meta(path: Path) -> dict[str, Any]:
    """The ``__meta__`` record of an item file (reads only that member of the npz)."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["__meta__"]))


# --------------------------------------------------------------------------------------------------- writer


class ProteinTargetWriter:
    """Write per-protein targets into ``root`` (one npz per name) and an ``index.json`` on :meth:`close`.

    ``meta`` is recorded in the index (e.g. the source model); reopening a directory whose index has a different
    value for one of these keys raises :class:`DataError`. ``overwrite=True`` deletes the items and index already
    in ``root`` first; otherwise they are kept and the writer resumes (``has(name)`` is true for them).
    Every item must have the same kinds with the same channel dims.
    """

    def __init__(self, root: str | os.PathLike, *, meta: dict | None = None, overwrite: bool = False):
        self.root = Path(root)
        self.items_dir = self.root / ITEMS
        self.meta: dict[str, Any] = dict(meta or {})
        self._items: dict[str, dict[str, Any]] = {}
        self._dims: dict[str, int] = {}
        self._ndims: dict[str, int] = {}
        self._files: dict[str, str] = {}  # lower-cased file name -> item name (case-insensitive file systems)
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"protein target store {self.root} exists and is not a directory")
        if overwrite:
            self._clear()
        self.items_dir.mkdir(parents=True, exist_ok=True)
        self._resume()
        self._write_index()  # records meta at once, so an interrupted run is checked against it on resume

    # -- opening -----------------------------------------------------------------------------------------------

    def _clear(self) -> None:
        (self.root / INDEX).unlink(missing_ok=True)
        if self.items_dir.is_dir():
            for p in self.items_dir.iterdir():
                if p.is_file() and (p.suffix == ".npz" or is_temp_name(p.name)):
                    p.unlink()

    def _resume(self) -> None:
        index_path = self.root / INDEX
        listed: dict[str, dict[str, Any]] = {}
        if index_path.is_file():
            index = _load_index(index_path)
            old_meta = index.get("meta", {})
            diff = sorted(k for k in self.meta if k in old_meta and old_meta[k] != self.meta[k])
            if diff:
                raise DataError(
                    f"protein target store {self.root} was written with different settings "
                    f"({', '.join(f'{k}: {old_meta[k]!r} != {self.meta[k]!r}' for k in diff)}); "
                    "use another directory or overwrite=True"
                )
            self.meta = {**old_meta, **self.meta}
            self._dims = {k: int(v) for k, v in index.get("targets", {}).items()}
            self._ndims = {k: int(v) for k, v in index.get("ndim", {}).items()}
            listed = index.get("items", {})
        by_file = {entry["file"]: name for name, entry in listed.items()}
        for p in sorted(self.items_dir.glob("*.npz")):
            rel = f"{ITEMS}/{p.name}"
            if rel in by_file:
                name = by_file[rel]
                self._register(name, listed[name])
                continue
            try:  # written by a run that stopped before close(); an unreadable file is simply rewritten
                m = _read_item_meta(p)
                shapes = m["shapes"]
            except Exception:  # noqa: BLE001
                continue
            self._check_kinds(m["name"], {k: tuple(s) for k, s in shapes.items()}, p)
            self._register(m["name"], {"file": rel, "length": len(m["sequence"]), "sequence": m["sequence"]})

    def _register(self, name: str, entry: dict[str, Any]) -> None:
        self._items[name] = entry
        self._files[Path(entry["file"]).name.lower()] = name

    # -- writing -----------------------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        """Whether ``name`` is already in the store (written now or by an earlier run)."""
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def _check_kinds(self, name: str, shapes: dict[str, tuple[int, ...]], where: Any) -> None:
        if self._dims and set(shapes) != set(self._dims):
            raise DataError(f"protein target item '{name}' ({where}) has kinds {sorted(shapes)} but the store holds "
                            f"{sorted(self._dims)}; every item needs the same kinds")
        for kind, shape in shapes.items():
            nd = self._ndims.get(kind, len(shape))
            if kind in self._dims and (self._dims[kind] != shape[-1] or nd != len(shape)):
                raise DataError(f"protein target item '{name}' ({where}): '{kind}' has shape {list(shape)} but the "
                                f"store holds {nd}-D '{kind}' arrays with {self._dims[kind]} channels")
        for kind, shape in shapes.items():
            self._dims.setdefault(kind, int(shape[-1]))
            self._ndims.setdefault(kind, len(shape))

    def add(self, name: str, sequence: str, arrays: dict[str, np.ndarray]) -> None:
        """Store ``arrays`` ({kind: (L, D) or (L, L, D)}, L = len(sequence)) for ``name``; see the module docstring
        for the float16 scaling. Raises :class:`DataError` on a wrong shape, a non-float dtype, NaN/inf, an unknown
        or inconsistent kind, or a name that is already stored."""
        if not isinstance(name, str) or not name:
            raise DataError(f"protein target name must be a non-empty string, got {name!r}")
        if not isinstance(sequence, str) or not sequence:
            raise DataError(f"protein target '{name}': sequence must be a non-empty string, got {sequence!r}")
        if self.has(name):
            raise DataError(f"protein target '{name}' is already in {self.root}; check has(name) to resume, "
                            "or open the writer with overwrite=True to start over")
        if not arrays:
            raise DataError(f"protein target '{name}': no arrays given")
        L = len(sequence)
        shapes: dict[str, tuple[int, ...]] = {}
        for kind, arr in arrays.items():
            where = f"protein target '{name}', kind '{kind}'"
            if not isinstance(kind, str) or not _KIND_RE.match(kind):
                raise DataError(f"{where}: kind must be an identifier like 'single', 'pair', 'structure'")
            a = np.asarray(arr)
            if not np.issubdtype(a.dtype, np.floating):
                raise DataError(f"{where}: expected a float array, got dtype {a.dtype}")
            want = 3 if (kind in PAIR_KINDS or (kind not in PER_RESIDUE_KINDS and a.ndim == 3)) else 2
            if a.ndim != want:
                raise DataError(f"{where}: expected a {want}-D array {'(L, L, D)' if want == 3 else '(L, D)'}, "
                                f"got shape {list(a.shape)}")
            if a.shape[: want - 1] != (L,) * (want - 1) or a.shape[-1] < 1:
                raise DataError(f"{where}: leading dims {list(a.shape[:-1])} do not match the sequence length {L} "
                                f"(expected shape {[L] * (want - 1) + ['D']}, got {list(a.shape)})")
            if not np.isfinite(a).all():
                raise DataError(f"{where}: array contains NaN or inf ({int((~np.isfinite(a)).sum())} entries)")
            check_target_values(a, where)  # all-zero vectors (cosine undefined), norms that overflow
            shapes[kind] = tuple(int(s) for s in a.shape)
        self._check_kinds(name, shapes, self.root)

        safe = _safe_name(name)
        if self._files.get(f"{safe}.npz".lower(), name) != name:  # collision (e.g. case-insensitive file system)
            safe = f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
        payload: dict[str, np.ndarray] = {}
        for kind, arr in arrays.items():
            a = np.asarray(arr)
            scale = _fp16_scale(float(np.abs(a).max()))
            payload[kind] = (a * a.dtype.type(scale)).astype(np.float16) if scale != 1.0 else a.astype(np.float16)
            payload[f"{kind}.scale"] = np.asarray(scale, dtype=np.float64)
        record = {"name": name, "sequence": sequence, "shapes": {k: list(s) for k, s in shapes.items()}}
        payload["__meta__"] = np.asarray(json.dumps(record))
        path = self.items_dir / f"{safe}.npz"
        atomic_savez(path, payload)
        self._register(name, {"file": f"{ITEMS}/{path.name}", "length": L, "sequence": sequence})

    def _write_index(self) -> None:
        index = {"format": FORMAT, "version": VERSION, "targets": dict(self._dims), "ndim": dict(self._ndims),
                 "items": self._items, "meta": self.meta}
        atomic_write_text(self.root / INDEX, json.dumps(index, indent=1))

    def close(self) -> None:
        """Write ``root/index.json`` listing every item (atomically)."""
        self._write_index()

    def __enter__(self) -> ProteinTargetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------- store


def _load_index(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"protein target store index not found: {path} (is this a reed protein target store?)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"protein target store index {path} is corrupt: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not a reed protein target store index (format must be {FORMAT!r})")
    if index.get("version") != VERSION:
        raise DataError(f"{path}: unsupported protein target store version {index.get('version')!r} "
                        f"(this reed reads version {VERSION})")
    items, targets = index.get("items"), index.get("targets")
    if not isinstance(items, dict) or not isinstance(targets, dict):
        raise DataError(f"{path}: 'items' and 'targets' must be JSON objects")
    for name, entry in items.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("sequence"), str) and entry.get("length") == len(entry["sequence"])):
            raise DataError(f"{path}: item '{name}' needs 'file', 'sequence' and a 'length' equal to the "
                            f"sequence length, got {entry!r}"[:400])
    return index


def sequence_window(name: str, stored: str, sequence: str) -> int:
    """Start of ``sequence`` in ``stored``: 0 if equal, else its offset if it occurs exactly once as a contiguous
    substring. Raises :class:`DataError` naming ``name`` and showing both sequences otherwise."""
    if sequence == stored:
        return 0
    starts, i = [], stored.find(sequence)
    while i >= 0 and len(starts) < 2:
        starts.append(i)
        i = stored.find(sequence, i + 1)
    if len(starts) == 1 and sequence:
        return starts[0]
    if len(starts) > 1:
        why = "occurs more than once in the stored sequence, so the window is ambiguous"
    else:
        first = next((k for k, (a, b) in enumerate(zip(stored, sequence)) if a != b), min(len(stored), len(sequence)))
        why = (f"is not a contiguous substring of the stored sequence (lengths {len(sequence)} vs {len(stored)}, "
               f"first difference at position {first})")
    raise DataError(f"protein targets for chain '{name}' were computed for a different sequence: the example's "
                    f"sequence {why}.\n  example: {short_sequence(sequence)}\n  stored:  {short_sequence(stored)}")


class ProteinTargetStore:
    """Read a directory written by :class:`ProteinTargetWriter`; items are loaded from disk on demand."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.index = _load_index(self.root / INDEX)
        self._items: dict[str, dict[str, Any]] = self.index["items"]
        self.dims: dict[str, int] = {k: int(v) for k, v in self.index["targets"].items()}
        self.meta: dict[str, Any] = self.index.get("meta", {})

    @property
    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def sequence(self, name: str) -> str:
        """The sequence the targets of ``name`` were computed for."""
        return self._entry(name)["sequence"]

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self._items[name]
        except KeyError:
            raise DataError(f"chain '{name}' has no protein targets in {self.root} ({len(self)} items; "
                            f"e.g. {self.names[:3]})") from None

    def get(self, name: str, sequence: str, kinds: Sequence[str]) -> dict[str, np.ndarray]:
        """Targets of ``name`` for the example ``sequence`` as float32 ``{kind: (L, D) or (L, L, D)}`` with
        L = len(sequence): the whole stored item, or the window where ``sequence`` occurs exactly once in it."""
        entry = self._entry(name)
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        unknown = [k for k in kinds if k not in self.dims]
        if unknown:
            raise DataError(f"protein target store {self.root} has no kind(s) {unknown}; it holds {sorted(self.dims)}")
        start = sequence_window(name, entry["sequence"], sequence)
        stop = start + len(sequence)
        path = self.root / entry["file"]
        out: dict[str, np.ndarray] = {}
        try:
            with np.load(path, allow_pickle=False) as z:
                for kind in kinds:
                    a = z[kind]
                    if a.shape[0] != entry["length"] or a.shape[-1] != self.dims[kind]:
                        raise DataError(f"protein target file {path} ('{name}'): '{kind}' has shape {list(a.shape)}, "
                                        f"expected length {entry['length']} and {self.dims[kind]} channels")
                    a = a[start:stop, start:stop] if a.ndim == 3 else a[start:stop]
                    scale = float(z[f"{kind}.scale"]) if f"{kind}.scale" in z.files else 1.0
                    a = a.astype(np.float32)
                    if scale != 1.0:
                        a /= np.float32(scale)
                    out[kind] = a
        except DataError:
            raise
        except (OSError, KeyError, ValueError, EOFError) as e:
            raise DataError(f"cannot read protein targets of chain '{name}' from {path}: {e}") from e
        return out

    def batch(self, names: Sequence[str], sequences: Sequence[str], kinds: Sequence[str], max_len: int,
              *, pair_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Zero-padded targets: per-residue kinds ``(B, max_len, D)``, pairwise kinds ``(B, max_len, max_len, D)``.

        All float32, except pairwise kinds in ``pair_dtype``: pass ``torch.float16`` to halve the memory of the
        largest tensor (the values are stored in fp16 anyway; very small-magnitude pair arrays lose the extra
        precision of the stored scale). A sequence longer than ``max_len`` raises :class:`DataError`."""
        if len(names) != len(sequences):
            raise DataError(f"batch: {len(names)} names but {len(sequences)} sequences")
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        items = []
        for name, seq in zip(names, sequences):
            if len(seq) > max_len:
                raise DataError(f"chain '{name}' has length {len(seq)} > max_len {max_len}")
            items.append(self.get(name, seq, kinds))
        out: dict[str, Tensor] = {}
        B = len(items)
        for kind in kinds:
            D = self.dims[kind]
            pairwise = bool(items) and items[0][kind].ndim == 3
            shape = (B, max_len, max_len, D) if pairwise else (B, max_len, D)
            t = torch.zeros(shape, dtype=pair_dtype if pairwise else torch.float32)
            for b, it in enumerate(items):
                a = torch.from_numpy(it[kind])
                L = a.shape[0]
                if pairwise:
                    t[b, :L, :L] = a
                else:
                    t[b, :L] = a
            out[kind] = t
        return out
