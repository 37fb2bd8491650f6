"""Protein backbone data for inverse folding: parsing, batching and the ProteinMPNN training-set layout.

Vocabulary and inputs follow ProteinMPNN (spec §1.1-1.2): 20 amino acids plus ``X`` (unknown) and a MASK token.
A :class:`ProteinExample` holds one chain (or one complex) as backbone coordinates N/CA/C/O with NaN for missing
atoms; :func:`collate` pads a list of them into the model's batch tensors. :func:`parse_structure` reads PDB/mmCIF
files with biotite; :meth:`ProteinDataset.from_pdb_2021aug02` reads ProteinMPNN's ``pdb_2021aug02`` training set
(spec §5): one example per sequence cluster, single chains, His-tags trimmed.
"""

from __future__ import annotations

import csv
import gzip
import io
import pickle
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reed.domains import require_extra
from reed.errors import DataError
from reed.io import progress_bar

require_extra("protein", "protein", "biotite")

__all__ = [
    "ALPHABET",
    "BACKBONE",
    "MASK_ID",
    "STRUCTURE_SUFFIXES",
    "VOCAB",
    "X_ID",
    "ProteinBatch",
    "ProteinDataset",
    "ProteinExample",
    "backbone_problem",
    "collate",
    "decode_sequence",
    "encode_sequence",
    "his_tag_bounds",
    "merge_chains",
    "parse_structure",
    "read_cluster_list",
    "token_batches",
    "trim_his_tag",
]

ALPHABET = "ACDEFGHIKLMNPQRSTVWYX"
X_ID = 20
MASK_ID = 21
VOCAB = 22
BACKBONE = ("N", "CA", "C", "O")
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")

_HIS_TAG = "HHHHHH"
_MAX_TAG_OFFSET = 4

_THREE_TO_ONE = {
    "ALA": "A", "CYS": "C", "ASP": "D", "GLU": "E", "PHE": "F", "GLY": "G", "HIS": "H", "ILE": "I",
    "LYS": "K", "LEU": "L", "MET": "M", "ASN": "N", "PRO": "P", "GLN": "Q", "ARG": "R", "SER": "S",
    "THR": "T", "VAL": "V", "TRP": "W", "TYR": "Y",
    "MSE": "M",  # selenomethionine, read as MET like ProteinMPNN's parse_PDB
}  # fmt: skip

# byte -> token lookup: upper- and lower-case letters of the alphabet, everything else X.
_ENCODE_TABLE = np.full(256, X_ID, dtype=np.int64)
for _i, _a in enumerate(ALPHABET):
    _ENCODE_TABLE[ord(_a)] = _i
    _ENCODE_TABLE[ord(_a.lower())] = _i
_DECODE = np.array(list(ALPHABET + "-"))


# ----------------------------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------------------------


def encode_sequence(seq: str) -> np.ndarray:
    """One-letter sequence -> ``(L,)`` int64 tokens (0..20); letters outside :data:`ALPHABET` become ``X_ID``."""
    raw = np.frombuffer(str(seq).encode("ascii", errors="replace"), dtype=np.uint8)
    return _ENCODE_TABLE[raw].copy()


def decode_sequence(tokens) -> str:
    """Tokens (list, ndarray or tensor, 0..21) -> string; the MASK token prints as ``-``."""
    if isinstance(tokens, Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"decode_sequence: tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return ""
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise DataError("decode_sequence: tokens must be integers")
        arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= VOCAB)
    if bad.any():
        raise DataError(f"decode_sequence: token {int(arr[bad][0])} outside the vocabulary 0..{VOCAB - 1}")
    return "".join(_DECODE[arr].tolist())


def his_tag_bounds(seq: str) -> tuple[int, int]:
    """``(start, stop)`` of ``seq`` left after removing a His-tag (ProteinMPNN's ``get_pdbs`` trimming).

    A run ``HHHHHH`` at the N-terminus, or starting 1-4 residues after it, is removed together with the residues
    before it; likewise at the C-terminus. Where several offsets match (a run longer than six), the largest one is
    used so the whole run goes (the reference applies every matching rule in turn and can cut far more).
    """
    n = len(seq)
    start, stop = 0, n
    for off in range(_MAX_TAG_OFFSET, -1, -1):
        if seq[off : off + 6] == _HIS_TAG:
            start = off + 6
            break
    for off in range(_MAX_TAG_OFFSET, -1, -1):
        lo = n - off - 6
        if lo >= 0 and seq[lo : n - off] == _HIS_TAG:
            stop = lo
            break
    return start, max(start, stop)


# ----------------------------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ProteinExample:
    """One chain or one complex: sequence plus backbone coordinates (N, CA, C, O; NaN where an atom is missing)."""

    name: str
    sequence: str
    coords: np.ndarray
    chain_index: np.ndarray
    chain_ids: list[str]

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.float32)
        self.chain_index = np.asarray(self.chain_index, dtype=np.int64)
        self.chain_ids = [str(c) for c in self.chain_ids]
        n = len(self.sequence)
        if self.coords.shape != (n, 4, 3):
            raise DataError(f"{self.name}: coords has shape {self.coords.shape}, expected ({n}, 4, 3)")
        if self.chain_index.shape != (n,):
            raise DataError(f"{self.name}: chain_index has shape {self.chain_index.shape}, expected ({n},)")
        if n and (self.chain_index.min() < 0 or self.chain_index.max() >= len(self.chain_ids)):
            raise DataError(f"{self.name}: chain_index refers to a chain beyond chain_ids {self.chain_ids}")

    @property
    def length(self) -> int:
        return len(self.sequence)

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def residue_mask(self) -> np.ndarray:
        """``(L,)`` bool: True iff all four backbone atoms are finite."""
        return np.isfinite(self.coords).all(axis=(1, 2))

    @property
    def tokens(self) -> np.ndarray:
        return encode_sequence(self.sequence)

    def select(self, index, name: str | None = None) -> ProteinExample:
        """Residues picked by ``index`` (slice, bool mask or integer array); chains left empty are dropped."""
        idx = np.arange(self.length)[index]
        chain_index = self.chain_index[idx]
        kept = [c for c in range(len(self.chain_ids)) if np.any(chain_index == c)]
        remap = np.full(max(len(self.chain_ids), 1), -1, dtype=np.int64)
        remap[kept] = np.arange(len(kept))
        return ProteinExample(
            name=self.name if name is None else name,
            sequence="".join(self.sequence[i] for i in idx),
            coords=self.coords[idx],
            chain_index=remap[chain_index],
            chain_ids=[self.chain_ids[c] for c in kept],
        )


def backbone_problem(example: ProteinExample) -> str | None:
    """Why no residue of ``example`` can be designed or trained on, or None when at least one residue has all four
    backbone atoms (N, CA, C, O). Such a chain would only ever be predicted as ``X`` (the reference skips batches
    holding one, with a warning)."""
    if example.residue_mask.any():
        return None
    if not np.isfinite(example.coords[:, 1]).all(axis=-1).any():
        return "no CA atoms (no residue with a complete N/CA/C/O backbone)"
    return "no residue with a complete N/CA/C/O backbone"


def trim_his_tag(example: ProteinExample) -> ProteinExample:
    """Remove N-/C-terminal His-tags (see :func:`his_tag_bounds`) from each chain of ``example``."""
    return _trim_his_tag(example)


def _trim_his_tag(example: ProteinExample) -> ProteinExample:
    keep = np.zeros(example.length, dtype=bool)
    for c in range(len(example.chain_ids)):
        pos = np.flatnonzero(example.chain_index == c)
        start, stop = his_tag_bounds("".join(example.sequence[i] for i in pos))
        keep[pos[start:stop]] = True
    if keep.all():
        return example
    return example.select(keep)


def merge_chains(examples: Sequence[ProteinExample], name: str) -> ProteinExample:
    """Concatenate examples (chains) into one multi-chain example, chain numbers following the input order."""
    examples = list(examples)
    if not examples:
        raise DataError(f"merge_chains: no chains to merge into {name!r}")
    chain_index, chain_ids, offset = [], [], 0
    for ex in examples:
        chain_index.append(ex.chain_index + offset)
        chain_ids.extend(ex.chain_ids)
        offset += len(ex.chain_ids)
    return ProteinExample(
        name=name,
        sequence="".join(ex.sequence for ex in examples),
        coords=np.concatenate([ex.coords for ex in examples], axis=0),
        chain_index=np.concatenate(chain_index),
        chain_ids=chain_ids,
    )


# ----------------------------------------------------------------------------------------------------------------
# Structure files
# ----------------------------------------------------------------------------------------------------------------


def structure_kind(path: Path) -> str | None:
    """``"pdb"`` or ``"cif"`` for a structure file name (also ``.gz``), None for anything else."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in STRUCTURE_SUFFIXES:
        if name.endswith(suffix):
            return "pdb" if suffix in (".pdb", ".ent") else "cif"
    return None


def _structure_stem(path: Path) -> str:
    name = path.name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return Path(name).stem


def _read_atoms(path: Path):
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    kind = structure_kind(path)
    if kind is None:
        raise DataError(f"{path}: unknown structure file type (expected one of {', '.join(STRUCTURE_SUFFIXES)}[.gz])")
    if not path.is_file():
        raise DataError(f"{path}: structure file not found")
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                text = fh.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot read structure file ({exc})") from exc
    if not text.strip():
        raise DataError(f"{path}: structure file is empty")
    try:
        if kind == "pdb":
            atoms = pdb.PDBFile.read(io.StringIO(text)).get_structure(model=1, altloc="first")
        else:
            cif = pdbx.CIFFile.read(io.StringIO(text))
            atoms = pdbx.get_structure(cif, model=1, altloc="first", use_author_fields=True)
    except Exception as exc:  # biotite raises many types on malformed input
        raise DataError(f"{path}: corrupt structure file ({type(exc).__name__}: {exc})") from exc
    if atoms.array_length() == 0:
        raise DataError(f"{path}: structure file has no atoms")
    return atoms


def parse_structure(
    path,
    *,
    chains: Sequence[str] | None = None,
    trim_his_tag: bool = True,
    min_length: int = 4,
) -> list[ProteinExample]:
    """Read a PDB / mmCIF file (optionally ``.gz``) into one :class:`ProteinExample` per protein chain, in file order.

    First model, first altloc; only amino-acid residues (including HETATM modified ones: MSE -> M, others -> X)
    with at least one backbone atom; hydrogens, water, ligands and nucleic acids are ignored. Chains shorter than
    ``min_length`` (after His-tag trimming) are dropped. Raises :class:`DataError` naming the file when it is
    corrupt, empty or has no usable protein chain, or when a requested chain is absent.
    """
    import biotite.structure as struc

    path = Path(path)
    atoms = _read_atoms(path)
    try:
        is_aa = struc.filter_amino_acids(atoms)
    except Exception as exc:
        raise DataError(f"{path}: cannot classify residues ({type(exc).__name__}: {exc})") from exc
    atoms = atoms[is_aa & ~np.isin(atoms.element, ("H", "D")) & np.isin(atoms.atom_name, BACKBONE)]
    if atoms.array_length() == 0:
        raise DataError(f"{path}: no protein chain (no amino-acid residue with backbone atoms)")

    starts = struc.get_residue_starts(atoms)
    n_res = len(starts)
    res_of_atom = np.repeat(np.arange(n_res), np.diff(np.append(starts, atoms.array_length())))
    coords = np.full((n_res, 4, 3), np.nan, dtype=np.float32)
    for k, atom_name in enumerate(BACKBONE):
        sel = atoms.atom_name == atom_name
        coords[res_of_atom[sel], k] = atoms.coord[sel]
    letters = np.array([_THREE_TO_ONE.get(str(r).upper(), "X") for r in atoms.res_name[starts]])
    res_chain = np.asarray(atoms.chain_id[starts]).astype(str)

    order: list[str] = list(dict.fromkeys(res_chain.tolist()))
    if chains is not None:
        wanted = [str(c) for c in chains]
        missing = [c for c in wanted if c not in order]
        if missing:
            raise DataError(f"{path}: chain(s) {missing} not found (protein chains: {order})")
        order = [c for c in order if c in set(wanted)]

    stem = _structure_stem(path)
    examples = []
    for chain_id in order:
        sel = res_chain == chain_id
        ex = ProteinExample(
            name=f"{stem}_{chain_id}",
            sequence="".join(letters[sel].tolist()),
            coords=coords[sel],
            chain_index=np.zeros(int(sel.sum()), dtype=np.int64),
            chain_ids=[chain_id],
        )
        if trim_his_tag:
            ex = _trim_his_tag(ex)
        if ex.length >= min_length and ex.length > 0:
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no protein chain with at least {min_length} residues")
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ProteinBatch:
    """Padded batch (spec §1.2): all tensors on one device."""

    X: Tensor
    S: Tensor
    mask: Tensor
    chain_M: Tensor
    residue_idx: Tensor
    chain_encoding: Tensor
    lengths: Tensor
    names: list[str] = field(default_factory=list)
    sequences: list[str] = field(default_factory=list)

    _TENSORS = ("X", "S", "mask", "chain_M", "residue_idx", "chain_encoding", "lengths")

    def to(self, device) -> ProteinBatch:
        """A copy on ``device`` (non-blocking: from pinned memory the copy overlaps compute)."""
        moved = {k: getattr(self, k).to(device, non_blocking=True) for k in self._TENSORS}
        return ProteinBatch(**moved, names=list(self.names), sequences=list(self.sequences))

    def pin_memory(self) -> ProteinBatch:
        """A copy in page-locked memory (what a DataLoader with ``pin_memory=True`` calls)."""
        pinned = {k: getattr(self, k).pin_memory() for k in self._TENSORS}
        return ProteinBatch(**pinned, names=list(self.names), sequences=list(self.sequences))

    def __len__(self) -> int:
        return int(self.S.shape[0])

    @property
    def device(self) -> torch.device:
        return self.S.device

    @property
    def residue_mask(self) -> Tensor:
        """``mask * chain_M``: residues whose identity is scored/designed."""
        return self.mask * self.chain_M


def collate(examples: Sequence[ProteinExample], device=None) -> ProteinBatch:
    """Pad examples into a :class:`ProteinBatch`.

    ``residue_idx`` follows ProteinMPNN's ``featurize``: ``100 * chain_no + position``, chain_no 0-based and the
    position running over the whole (concatenated) example; padding -100. ``chain_encoding`` is chain_no + 1,
    padding 0. ``S`` pads with ``X_ID``; ``X`` has NaN replaced by 0 and ``mask`` is 1 only for real residues with
    all four backbone atoms finite.
    """
    examples = list(examples)
    if not examples:
        raise DataError("collate: empty list of examples")
    b = len(examples)
    lengths = np.array([ex.length for ex in examples], dtype=np.int64)
    L = max(int(lengths.max()), 1)
    X = np.zeros((b, L, 4, 3), dtype=np.float32)
    S = np.full((b, L), X_ID, dtype=np.int64)
    mask = np.zeros((b, L), dtype=np.float32)
    chain_M = np.zeros((b, L), dtype=np.float32)
    residue_idx = np.full((b, L), -100, dtype=np.int64)
    chain_encoding = np.zeros((b, L), dtype=np.int64)
    for i, ex in enumerate(examples):
        n = ex.length
        finite = np.isfinite(ex.coords)
        X[i, :n] = np.where(finite, ex.coords, 0.0)
        S[i, :n] = encode_sequence(ex.sequence)
        mask[i, :n] = finite.all(axis=(1, 2))
        chain_M[i, :n] = 1.0
        residue_idx[i, :n] = 100 * ex.chain_index + np.arange(n)
        chain_encoding[i, :n] = ex.chain_index + 1
    batch = ProteinBatch(
        X=torch.from_numpy(X),
        S=torch.from_numpy(S),
        mask=torch.from_numpy(mask),
        chain_M=torch.from_numpy(chain_M),
        residue_idx=torch.from_numpy(residue_idx),
        chain_encoding=torch.from_numpy(chain_encoding),
        lengths=torch.from_numpy(lengths),
        names=[ex.name for ex in examples],
        sequences=[ex.sequence for ex in examples],
    )
    return batch if device is None else batch.to(device)


def token_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group indices into batches of at most ``budget`` tokens (max length x batch size), shortest first.

    Like ProteinMPNN's ``StructureLoader`` but the example that overflows a batch starts the next one instead of
    being dropped; an example longer than ``budget`` gets a batch of its own. Deterministic.
    """
    if int(budget) <= 0:
        raise DataError(f"token_batches: budget must be a positive number of tokens, got {budget}")
    lengths = [int(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = max(longest, lengths[i])
        if current and size * (len(current) + 1) > budget:
            batches.append(current)
            current, longest = [], 0
            size = lengths[i]
        current.append(i)
        longest = size
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or f.size == 0 or np.any(~np.isfinite(f)) or np.any(f < 0) or f.sum() <= 0:
        raise DataError(f"split: fractions must be non-negative with a positive sum, got {tuple(fractions)}")
    f = f / f.sum()
    raw = f * n
    counts = np.floor(raw).astype(np.int64)
    for k in np.argsort(-(raw - counts), kind="stable")[: n - int(counts.sum())]:
        counts[k] += 1
    # at least one example for every non-zero fraction, taken from the largest part
    for k in np.flatnonzero((f > 0) & (counts == 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[k] += 1
    return counts.tolist()


_MAX_NAMED = 20  # skipped files/chains named in one warning or error


def _skip_summary(skipped: Sequence[tuple[str, str]]) -> str:
    """``"a.pdb: corrupt ...; b.pdb: chain B: no CA atoms ..."`` for the first ``_MAX_NAMED`` skipped entries."""
    text = "; ".join(f"{Path(path).name}: {reason}" for path, reason in skipped[:_MAX_NAMED])
    if len(skipped) > _MAX_NAMED:
        text += f"; ... and {len(skipped) - _MAX_NAMED} more"
    return text


def _warn_skipped(where, skipped: Sequence[tuple[str, str]], total: int, unit: str) -> None:
    """One warning naming the skipped files/chains and why (the loaders' ``skipped`` lists all of them)."""
    if skipped:
        warnings.warn(f"{where}: skipped {len(skipped)} of {total} {unit}: {_skip_summary(skipped)}", stacklevel=3)


def _cluster_key(value) -> str:
    """A cluster id as compared across list.csv, the split files and a cluster list: integers by value (the
    reference parses them with ``int``, so ``"007"`` is cluster 7), anything else as its stripped text."""
    text = str(value).strip()
    try:
        return str(int(text))
    except ValueError:
        return text


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers and strings only: any class or function reference is refused."""

    _SAFE = {("builtins", "set"), ("builtins", "frozenset")}  # how protocols < 4 write sets

    def find_class(self, module: str, name: str):
        if (module, name) in self._SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from exc


def read_cluster_list(path) -> set[str]:
    """Cluster ids in ``path``: a text file with one id per line (ProteinMPNN's ``valid_clusters.txt``), or a pickle
    of a dict whose keys are the ids (REED's ``cluster_seq_dict_removeX.pkl``: cluster -> sequence of the clusters
    with AlphaFold3 embeddings) or of a list/set of ids. Pickles are read without executing code: only plain
    containers of numbers and strings load."""
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pickle"):
        if not path.is_file():
            raise DataError(f"{path}: cluster list not found")
        try:
            with open(path, "rb") as fh:
                obj = _PlainUnpickler(fh).load()
        except Exception as exc:  # pickle raises many types on foreign or corrupt input
            raise DataError(f"{path}: not a pickle of plain cluster ids ({type(exc).__name__}: {exc}); "
                            "write the ids one per line to a .txt file instead") from exc
        if not isinstance(obj, (dict, list, tuple, set, frozenset)):
            raise DataError(f"{path}: expected a dict keyed by cluster id or a list of ids, got {type(obj).__name__}")
        ids = list(obj)
    else:
        ids = _read_text(path, "cluster list").split()
    bad = [i for i in ids if not isinstance(i, (int, str))]
    if bad:
        raise DataError(f"{path}: cluster ids must be integers or strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return {_cluster_key(i) for i in ids}


class ProteinDataset:
    """A list of :class:`ProteinExample` with ``names``, ``lengths`` and ``skipped`` (list of ``(path, reason)``)."""

    def __init__(self, examples: Iterable[ProteinExample], skipped: Iterable[tuple[str, str]] | None = None):
        self.examples: list[ProteinExample] = list(examples)
        self.skipped: list[tuple[str, str]] = list(skipped or [])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> ProteinExample:
        return self.examples[i]

    def __iter__(self):
        return iter(self.examples)

    def __repr__(self) -> str:
        return f"ProteinDataset({len(self)} examples, {len(self.skipped)} skipped)"

    @property
    def names(self) -> list[str]:
        return [ex.name for ex in self.examples]

    @property
    def lengths(self) -> list[int]:
        return [ex.length for ex in self.examples]

    def subset(self, indices) -> ProteinDataset:
        """Examples at ``indices`` (in that order); ``skipped`` is carried over."""
        return ProteinDataset([self.examples[int(i)] for i in indices], self.skipped)

    def split(self, fractions=(0.8, 0.1, 0.1), seed: int = 0, *, by: str = "example") -> tuple[ProteinDataset, ...]:
        """Deterministic random split; each part keeps the original order of its examples.

        ``by="example"`` splits examples; ``by="sequence"`` splits the groups of examples with identical sequences
        (chains of a homo-oligomer stay together), so no sequence is in two parts — the fractions then count
        groups.
        """
        if by not in ("example", "sequence"):
            raise DataError(f"split: by must be 'example' or 'sequence', got {by!r}")
        if by == "example":
            groups = [[i] for i in range(len(self))]
        else:
            first: dict[str, list[int]] = {}
            for i, e in enumerate(self.examples):
                first.setdefault(e.sequence, []).append(i)
            groups = list(first.values())
        counts = _split_counts(len(groups), fractions)
        perm = np.random.default_rng(seed).permutation(len(groups))
        parts, start = [], 0
        for c in counts:
            idx = [i for g in perm[start : start + c] for i in groups[g]]
            parts.append(self.subset(np.sort(np.asarray(idx, dtype=np.int64))))
            start += c
        return tuple(parts)

    def batches(self, budget: int) -> list[list[int]]:
        return token_batches(self.lengths, budget)

    # ------------------------------------------------------------------ loaders

    @classmethod
    def from_directory(
        cls,
        path,
        *,
        mode: str = "chain",
        max_length: int | None = 256,
        min_length: int = 4,
        progress: bool = False,
    ) -> ProteinDataset:
        """All ``*.pdb, *.ent, *.cif, *.mmcif`` (and ``.gz``) files in ``path``, sorted by name.

        ``mode="chain"``: one example per chain; ``"complex"``: one multi-chain example per file. Unreadable files,
        chains without any residue with a complete N/CA/C/O backbone (a complex keeps its other chains) and
        examples longer than ``max_length`` are listed in ``skipped`` and named in one warning; a directory
        where nothing is usable is a :class:`DataError` naming what was skipped and why.
        """
        if mode not in ("chain", "complex"):
            raise DataError(f"from_directory: mode must be 'chain' or 'complex', got {mode!r}")
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"{root}: structure directory not found")
        files = sorted(
            (p for p in root.iterdir() if structure_kind(p) is not None and p.is_file()), key=lambda p: p.name
        )
        if not files:
            raise DataError(f"{root}: no structure files (expected {', '.join(STRUCTURE_SUFFIXES)}, optionally .gz)")
        examples: list[ProteinExample] = []
        skipped: list[tuple[str, str]] = []
        for f in progress_bar(files, progress, f"reading {root.name}"):
            try:
                chains = parse_structure(f, min_length=min_length)
            except DataError as exc:
                skipped.append((str(f), str(exc).removeprefix(f"{f}: ")))
                continue
            usable = []
            for ex in chains:
                problem = backbone_problem(ex)
                if problem is None:
                    usable.append(ex)
                else:  # a chain without any complete backbone residue has nothing to learn from
                    skipped.append((str(f), f"chain {ex.chain_ids[0]}: {problem}"))
            if not usable:
                continue
            items = usable if mode == "chain" else [merge_chains(usable, _structure_stem(f))]
            for ex in items:
                if max_length is not None and ex.length > max_length:
                    skipped.append((str(f), f"{ex.name}: length {ex.length} > max_length {max_length}"))
                else:
                    examples.append(ex)
        if not examples:
            detail = f": {_skip_summary(skipped)}" if skipped else ""
            raise DataError(f"{root}: no usable protein structures ({len(files)} structure files, "
                            f"{len(skipped)} skipped{detail})")
        _warn_skipped(root, skipped, len(examples) + len(skipped), "structure files/chains")
        return cls(examples, skipped)

    @classmethod
    def from_pdb_2021aug02(
        cls,
        root,
        split: str = "train",
        *,
        max_length: int = 256,
        max_resolution: float = 3.5,
        member: str = "first",
        seed: int = 0,
        progress: bool = False,
        index: str = "list.csv",
        clusters: Iterable | None = None,
    ) -> ProteinDataset:
        """ProteinMPNN's ``pdb_2021aug02`` layout: one single-chain example per sequence cluster of ``split``.

        The index ``root/{index}`` (``list.csv``, or REED's ``list_filtered.csv``; an absolute path is used as is)
        has the columns CHAINID, DEPOSITION, RESOLUTION, HASH, CLUSTER, SEQUENCE. Rows are kept when RESOLUTION <=
        max_resolution and len(SEQUENCE) <= max_length (the reference's date cut, 2030-01-01, removes nothing).
        A row's cluster decides its split as in the reference's ``build_training_clusters``: listed in
        ``valid_clusters.txt`` -> valid, else listed in ``test_clusters.txt`` -> test, else train; cluster ids
        compare as integers. ``clusters`` (ids, e.g. :func:`read_cluster_list` of REED's
        ``cluster_seq_dict_removeX.pkl``: the clusters with AlphaFold3 embeddings) then keeps only the clusters of
        the split that are also in it -- the intersection REED's training script takes (23346/1464/1539 ->
        23079/1455/1533 train/valid/test clusters). ``member="first"`` takes a cluster's first remaining row (as
        the reference), ``"random"`` a seeded random one. Chains come from ``root/pdb/{id[1:3]}/{id}_{chain}.pt``;
        His-tags are trimmed; chains under 4 residues or with letters outside the alphabet are dropped (as the
        reference), and so are chains with no complete backbone residue (the reference skips each batch holding
        one) and missing or unreadable files. The skipped chains are listed in ``skipped`` and named in one
        warning.
        """
        root = Path(root)
        if split not in ("train", "valid", "test"):
            raise DataError(f"from_pdb_2021aug02: split must be 'train', 'valid' or 'test', got {split!r}")
        if member not in ("first", "random"):
            raise DataError(f"from_pdb_2021aug02: member must be 'first' or 'random', got {member!r}")
        list_path = root / index
        if not list_path.is_file():
            raise DataError(f"{list_path}: index file not found (expected the pdb_2021aug02 layout under {root})")

        def read_split(name: str) -> set[str]:
            p = root / name
            if not p.is_file():
                raise DataError(f"{p}: cluster list not found")
            return read_cluster_list(p)

        valid_ids, test_ids = read_split("valid_clusters.txt"), read_split("test_clusters.txt")
        keep = None if clusters is None else {_cluster_key(c) for c in clusters}

        by_cluster: dict[str, list[str]] = {}
        in_split_rows = 0
        need = {"CHAINID", "RESOLUTION", "CLUSTER", "SEQUENCE"}
        try:
            fh = open(list_path, newline="", encoding="utf-8")
        except OSError as exc:
            raise DataError(f"{list_path}: cannot read index file ({exc})") from exc
        try:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not need <= set(reader.fieldnames):
                raise DataError(f"{list_path}: missing columns {sorted(need - set(reader.fieldnames or []))} "
                                "(expected CHAINID, DEPOSITION, RESOLUTION, HASH, CLUSTER, SEQUENCE)")
            for line_no, row in enumerate(reader, start=2):
                if any(row.get(k) is None for k in need):
                    raise DataError(f"{list_path}:{line_no}: row has {len(row)} fields, fewer than the header")
                try:
                    resolution = float(row["RESOLUTION"])
                except (TypeError, ValueError) as exc:
                    raise DataError(f"{list_path}:{line_no}: bad RESOLUTION {row['RESOLUTION']!r}") from exc
                if not resolution <= max_resolution or len(row["SEQUENCE"] or "") > max_length:
                    continue
                cluster = _cluster_key(row["CLUSTER"])
                in_split = ("valid" if cluster in valid_ids else "test" if cluster in test_ids else "train") == split
                in_split_rows += in_split
                if in_split and (keep is None or cluster in keep):
                    by_cluster.setdefault(cluster, []).append(str(row["CHAINID"]).strip())
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{list_path}: not a CSV index file ({exc})") from exc
        finally:
            fh.close()
        if not by_cluster:
            why = (f"none of its {split} clusters is in the cluster list" if keep is not None and in_split_rows
                   else f"no row of split {split!r} passes RESOLUTION <= {max_resolution} and length <= {max_length}")
            raise DataError(f"{list_path}: no chains for split {split!r}: {why}")

        rng = np.random.default_rng(seed)
        chosen = []
        for members in by_cluster.values():
            chosen.append(members[0] if member == "first" else members[int(rng.integers(len(members)))])

        examples: list[ProteinExample] = []
        skipped: list[tuple[str, str]] = []
        for chain_name in progress_bar(chosen, progress, f"pdb_2021aug02 {split}"):
            pdb_id, _, chain = chain_name.partition("_")
            pt = root / "pdb" / pdb_id[1:3] / f"{chain_name}.pt"
            try:
                ex = _load_mpnn_chain(pt, chain_name, pdb_id, chain)
            except DataError as exc:
                skipped.append((str(pt), str(exc).removeprefix(f"{pt}: ")))
                continue
            ex = _trim_his_tag(ex)
            problem = backbone_problem(ex)
            if ex.length < 4:
                skipped.append((str(pt), f"{chain_name}: {ex.length} residues after His-tag trimming (< 4)"))
            elif ex.length > max_length:
                skipped.append((str(pt), f"{chain_name}: length {ex.length} > max_length {max_length}"))
            elif any(a not in ALPHABET for a in ex.sequence):
                skipped.append((str(pt), f"{chain_name}: sequence has letters outside {ALPHABET}"))
            elif problem is not None:
                skipped.append((str(pt), f"{chain_name}: {problem}"))
            else:
                examples.append(ex)
        if not examples:
            raise DataError(f"{root}: no usable chains for split {split!r} ({len(skipped)} skipped: "
                            f"{_skip_summary(skipped)})")
        _warn_skipped(f"{root} ({split})", skipped, len(chosen), "cluster representatives")
        return cls(examples, skipped)


def _load_mpnn_chain(pt: Path, name: str, pdb_id: str, chain: str) -> ProteinExample:
    if not pt.is_file():
        raise DataError(f"{pt}: chain file not found")
    try:
        data = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{pt}: corrupt chain file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or "seq" not in data or "xyz" not in data:
        raise DataError(f"{pt}: chain file lacks 'seq' / 'xyz'")
    seq = str(data["seq"])
    xyz = torch.as_tensor(data["xyz"]).detach().float().cpu().numpy()
    if xyz.ndim != 3 or xyz.shape[0] != len(seq) or xyz.shape[1] < 4 or xyz.shape[2] != 3:
        raise DataError(f"{pt}: field 'xyz' has shape {xyz.shape}, expected ({len(seq)}, 14, 3)")
    coords = xyz[:, :4].copy()
    if "mask" in data:
        m = torch.as_tensor(data["mask"]).cpu().numpy().astype(bool)
        if m.shape[:1] == (len(seq),) and m.ndim == 2 and m.shape[1] >= 4:
            coords[~m[:, :4]] = np.nan
    return ProteinExample(
        name=name,
        sequence=seq,
        coords=coords,
        chain_index=np.zeros(len(seq), dtype=np.int64),
        chain_ids=[chain],
    )
