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
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reed.errors import DataError, ReedError
from reed.io import atomic_savez, atomic_write_text, is_temp_name, progress_bar

FORMAT = "reed-protein-targets"
VERSION = 1
INDEX = "index.json"
ITEMS = "items"
PER_RESIDUE_KINDS = ("single", "structure")
PAIR_KINDS = ("pair",)
AF3_KEYS = {"single": "single_embeddings", "pair": "pair_embeddings", "structure": "structure_embeddings"}
AF3_EMBEDDINGS = Path("seed-0_embeddings") / "embeddings.npz"
DEFAULT_ESM2 = "facebook/esm2_t33_650M_UR50D"
_TARGET_EXP = 14  # scaled max magnitude lies in (2**13, 2**14]; fp16 max is 65504 ~ 2**16
_KIND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_ESM_LETTERS = frozenset("LAGVSERTDIKPNQFYMHWCXBUZO")


def _short(seq: str, n: int = 60) -> str:
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
                    f"sequence {why}.\n  example: {_short(sequence)}\n  stored:  {_short(stored)}")


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


# ------------------------------------------------------------------------------------------ standardisation


# --------------------------------------------------------------------------------------------------- ESM-2


ESM_VOCAB = ("<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "D", "I", "K", "P", "N",
             "Q", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")


def save_random_esm2(path: str | os.PathLike, *, hidden: int = 16, layers: int = 2, heads: int = 2,
                     seed: int = 0) -> Path:
    """Save a randomly initialised ESM-2-architecture model (real ESM vocabulary and tokenizer) to ``path``.

    For tests and offline benchmarks where the pretrained weights cannot be downloaded: it goes through the same
    loading code as ``facebook/esm2_*``, but its representations are those of an untrained network.
    """
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(ESM_VOCAB) + "\n")
    tok = EsmTokenizer(str(d / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = EsmConfig(vocab_size=len(ESM_VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=2 * hidden, pad_token_id=1, mask_token_id=32,
                    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                    max_position_embeddings=1026)
    EsmForMaskedLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def _model_help(model: str) -> str:
    hub = model if not _looks_like_path(model) else DEFAULT_ESM2
    return (f"on a machine with internet run `huggingface-cli download {hub} --local-dir DIR` (or "
            f"`EsmModel.from_pretrained('{hub}').save_pretrained(DIR)` plus the tokenizer) and pass model=DIR")


def load_esm2(model: str = DEFAULT_ESM2, *, device: str | torch.device = "cpu", attentions: bool = True):
    """``(tokenizer, EsmModel)`` from a local directory or a hub id (the hub cache, or a download when online);
    eval mode, gradients off. Raises :class:`ReedError` naming the model when it cannot be loaded."""
    from transformers import AutoTokenizer, EsmModel

    src = os.path.expanduser(str(model))
    if not Path(src).exists() and _looks_like_path(str(model)):
        raise ReedError(f"ESM-2 model directory not found: {model}; {_model_help(str(model))}")
    kwargs: dict[str, Any] = {"add_pooling_layer": False}
    if attentions:
        kwargs["attn_implementation"] = "eager"  # sdpa/flash kernels do not return attention maps
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        esm, info = EsmModel.from_pretrained(src, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ReedError(f"cannot load ESM-2 model '{model}' ({msg}); {_model_help(str(model))}") from e
    missing = sorted(k for k in info.get("missing_keys", ()) if k.split(".")[0] not in ("pooler", "contact_head"))
    if missing or info.get("mismatched_keys"):
        raise ReedError(f"ESM-2 model '{model}' lacks weights {missing[:8]} or has wrong shapes "
                        f"{list(info.get('mismatched_keys', []))[:8]}; is it an ESM-2 checkpoint?")
    return tokenizer, esm.float().to(device).eval().requires_grad_(False)


def _esm_ids(tokenizer, seq: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    fallback = vocab.get("X", tokenizer.unk_token_id)
    body = [vocab[c] if c in _ESM_LETTERS and c in vocab else fallback for c in seq.upper()]
    return [tokenizer.cls_token_id, *body, tokenizer.eos_token_id]


def _budget_batches(lengths: Sequence[int], order: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Consecutive groups of ``order`` whose padded size (max length + 2) * count stays within ``batch_tokens``
    (a single sequence over the budget forms its own batch)."""
    batch: list[int] = []
    longest = 0
    for i in order:
        t = lengths[i] + 2
        if batch and max(longest, t) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, t)
    if batch:
        yield batch


def esm2_embeddings(sequences: list[str], model: str = DEFAULT_ESM2, *, layer: int = -1,
                    pair: str | None = "attention", device: str | torch.device = "cpu", batch_tokens: int = 4096,
                    progress: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """ESM-2 targets for each sequence, yielded in input order.

    ``single``: hidden state (L, hidden) of ``layer`` with BOS/EOS removed; layers are counted like fair-esm's
    ``repr_layers``: 0 = token embeddings, n_layers = the last layer (after the final LayerNorm), negative values
    from the end (default -1 = last). ``pair`` (when ``pair == "attention"``): every layer's and head's attention
    map with BOS/EOS removed, (L, L, n_layers * n_heads) ordered layer-major, symmetrised (A + A^T) / 2.
    Letters outside the ESM alphabet (and lower case is upper-cased) become ``X``.

    Sequences are sorted by length within windows of the input and batched so that padded tokens per batch stay
    within ``batch_tokens``; padding does not change the values (attention masks exclude it). ``model`` is a hub
    id or a local directory (see :func:`load_esm2`)."""
    from tqdm.auto import tqdm

    if pair not in (None, "attention"):
        raise ReedError(f"esm2_embeddings: pair must be 'attention' or None, got {pair!r}")
    sequences = list(sequences)
    for i, s in enumerate(sequences):
        if not isinstance(s, str) or not s:
            raise DataError(f"esm2_embeddings: sequence {i} is empty or not a string ({s!r})")
    if not sequences:
        return
    tokenizer, esm = load_esm2(model, device=device, attentions=pair == "attention")
    n_layers = int(esm.config.num_hidden_layers)
    li = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= li <= n_layers:
        raise ReedError(f"esm2_embeddings: layer {layer} out of range for '{model}' with {n_layers} layers")
    dev = next(esm.parameters()).device
    lengths = [len(s) for s in sequences]
    # Sort within windows so results can be yielded in input order without buffering the whole data set
    # (pair maps are large: L*L*n_layers*n_heads floats each).
    window_tokens = batch_tokens * (4 if pair else 64)
    bar = tqdm(total=len(sequences), desc="ESM-2", disable=not progress)
    start = 0
    while start < len(sequences):
        stop, tokens = start, 0
        while stop < len(sequences) and (stop == start or tokens + lengths[stop] + 2 <= window_tokens):
            tokens += lengths[stop] + 2
            stop += 1
        order = sorted(range(start, stop), key=lambda i: -lengths[i])
        done: dict[int, dict[str, np.ndarray]] = {}
        for group in _budget_batches(lengths, order, batch_tokens):
            done.update(_esm_batch(tokenizer, esm, [sequences[i] for i in group], group, li, n_layers, pair, dev))
            bar.update(len(group))
        for i in range(start, stop):
            yield done.pop(i)
        start = stop
    bar.close()


@torch.no_grad()
def _esm_batch(tokenizer, esm, seqs: list[str], idx: list[int], li: int, n_layers: int, pair: str | None,
               dev: torch.device) -> dict[int, dict[str, np.ndarray]]:
    ids = [_esm_ids(tokenizer, s) for s in seqs]
    T = max(len(t) for t in ids)
    input_ids = torch.full((len(ids), T), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(ids), T), dtype=torch.long)
    for b, t in enumerate(ids):
        input_ids[b, : len(t)] = torch.tensor(t)
        attn[b, : len(t)] = 1
    out = esm(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=li != n_layers,
              output_attentions=pair == "attention")
    hidden = out.last_hidden_state if li == n_layers else out.hidden_states[li]
    maps = torch.stack(out.attentions, dim=1).flatten(1, 2) if pair == "attention" else None  # (B, C, T, T)
    if maps is not None and maps.shape[1] != n_layers * esm.config.num_attention_heads:
        raise ReedError(f"ESM-2 returned {maps.shape[1]} attention maps, expected layers*heads")
    res: dict[int, dict[str, np.ndarray]] = {}
    for b, (i, s) in enumerate(zip(idx, seqs)):
        L = len(s)
        item = {"single": hidden[b, 1 : L + 1].float().cpu().numpy()}
        if maps is not None:
            a = maps[b, :, 1 : L + 1, 1 : L + 1].float()
            item["pair"] = ((a + a.transpose(1, 2)) * 0.5).permute(1, 2, 0).contiguous().cpu().numpy()
        res[i] = item
    return res


def embed_proteins_esm2(names: Sequence[str], sequences: Sequence[str], out: str | os.PathLike, *,
                        model: str = DEFAULT_ESM2, layer: int = -1, pair: str | None = "attention",
                        device: str | torch.device = "cpu", batch_tokens: int = 4096,
                        progress: bool = True) -> ProteinTargetStore:
    """Write ESM-2 targets (:func:`esm2_embeddings`) for ``names`` into a store at ``out`` and open it. Names
    already in ``out`` are skipped, so an interrupted run resumes; the model, layer and pair setting are recorded in
    the store's meta and must match on resume."""
    names, sequences = list(names), list(sequences)
    if len(names) != len(sequences):
        raise DataError(f"embed_proteins_esm2: {len(names)} names but {len(sequences)} sequences")
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise DataError(f"embed_proteins_esm2: duplicate names {dup[:10]}")
    writer = ProteinTargetWriter(out, meta={"source": "esm2", "model": str(model), "layer": int(layer),
                                            "pair": pair})
    todo = [i for i, n in enumerate(names) if not writer.has(n)]
    try:
        embs = esm2_embeddings([sequences[i] for i in todo], model, layer=layer, pair=pair, device=device,
                               batch_tokens=batch_tokens, progress=progress)
        for i, arrays in zip(todo, embs):
            writer.add(names[i], sequences[i], arrays)
    finally:
        writer.close()
    return ProteinTargetStore(out)


# ------------------------------------------------------------------------------------------------------ AF3


def _af3_sanitised(job: str) -> str:
    """AF3's output folder name for a job name (lower case, spaces to '_', only [a-z0-9_.-] kept)."""
    return "".join(c for c in job.lower().replace(" ", "_") if c.isalnum() or c in "_-.")


def _af3_job_dir(af3_dir: Path, job: str) -> Path:
    p = af3_dir / job
    if not p.is_dir():
        alt = af3_dir / _af3_sanitised(job)
        if alt.is_dir():
            return alt
    return p


def read_af3_job_sequence(job_dir: str | os.PathLike) -> str | None:
    """The first protein sequence AF3 folded in ``job_dir`` (from ``{job}/{job}_data.json``:
    ``sequences[0].protein.sequence``), or None when that file or field is absent. Unreadable JSON raises
    :class:`DataError` naming the file."""
    job_dir = Path(job_dir)
    path = job_dir / f"{job_dir.name}_data.json"
    if not path.is_file():
        found = sorted(job_dir.glob("*_data.json")) if job_dir.is_dir() else []
        if len(found) != 1:
            return None
        path = found[0]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read AF3 job data {path}: {e}") from e
    try:
        seq = data["sequences"][0]["protein"]["sequence"]
    except (KeyError, IndexError, TypeError):
        return None
    return seq if isinstance(seq, str) else None


def import_af3_embeddings(af3_dir: str | os.PathLike, out: str | os.PathLike, *,
                          chains: dict[str, tuple[str, str]], progress: bool = True) -> ProteinTargetStore:
    """Import AF3 embeddings (reference layout ``af3_dir/{job}/seed-0_embeddings/embeddings.npz`` with
    ``single_embeddings`` (Npad, 384), ``pair_embeddings`` (Npad, Npad, 128), ``structure_embeddings`` (Npad, 768))
    into a store at ``out``. ``chains`` maps our example name -> (AF3 job name, the sequence AF3 folded); each is
    stored under the example name with kinds single/pair/structure sliced to the folded length (dropping the AF3
    bucket padding), together with the folded sequence. Training looks items up with the example's own sequence,
    which must equal the folded one or occur once inside it (:meth:`ProteinTargetStore.get`).

    Every job is checked first: a missing job folder, embeddings file or key, a bucket shorter than the folded
    sequence, or a folded sequence that differs from the one in the job's ``{job}_data.json`` is collected, and one
    :class:`DataError` lists them (up to 10) before anything is written. Names already in ``out`` are skipped."""
    af3_dir = Path(af3_dir)
    if not af3_dir.is_dir():
        raise DataError(f"AF3 output directory not found: {af3_dir}")
    writer = ProteinTargetWriter(out, meta={"source": "af3", "af3_dir": str(af3_dir)})
    todo = [n for n in chains if not writer.has(n)]
    problems: list[str] = []
    plan: list[tuple[str, str, Path]] = []
    for name in todo:
        entry = chains[name]
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            problems.append(f"'{name}': expected (job name, folded sequence), got {entry!r}"[:200])
            continue
        job, seq = entry
        if not seq:
            problems.append(f"'{name}' (job {job}): empty folded sequence")
            continue
        job_dir = _af3_job_dir(af3_dir, job)
        path = job_dir / AF3_EMBEDDINGS
        if not job_dir.is_dir():
            problems.append(f"'{name}': AF3 job folder {job_dir} not found")
            continue
        if not path.is_file():
            problems.append(f"'{name}': AF3 embeddings file {path} not found")
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
        except (OSError, ValueError, EOFError) as e:
            problems.append(f"'{name}': cannot read {path}: {e}")
            continue
        missing = [k for k in AF3_KEYS.values() if k not in files]
        if missing:
            problems.append(f"'{name}': {path} lacks key(s) {missing}")
            continue
        folded = read_af3_job_sequence(job_dir)
        if folded is not None and folded != seq:
            problems.append(f"'{name}': job {job} folded {_short(folded, 40)} but chains gives {_short(seq, 40)}")
            continue
        plan.append((name, seq, path))
    if problems:
        writer.close()
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} of {len(todo)} AF3 jobs in {af3_dir} are missing or unusable:\n  "
                        + "\n  ".join(problems[:10]) + more)
    try:
        for name, seq, path in progress_bar(plan, progress, "AF3 embeddings"):
            writer.add(name, seq, _read_af3(path, name, len(seq)))
    finally:
        writer.close()
    return ProteinTargetStore(out)


def _read_af3(path: Path, name: str, L: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as z:
        for kind, key in AF3_KEYS.items():
            a = z[key]
            want = 3 if kind == "pair" else 2
            if a.ndim != want or a.shape[0] < L or (want == 3 and a.shape[1] < L):
                raise DataError(f"AF3 embeddings {path} ('{name}'): '{key}' has shape {list(a.shape)}, expected "
                                f"{want}-D with at least {L} tokens (the folded sequence length)")
            arrays[kind] = np.ascontiguousarray(a[:L, :L] if want == 3 else a[:L])
    return arrays

