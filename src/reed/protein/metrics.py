"""Protein inverse-folding evaluation (spec ``protein.md`` §6): sequence recovery, perplexity, structure
superposition (Kabsch, RMSD, TM-score) and refolding of designed sequences with ESMFold.

Token convention: 22 tokens, ``"ACDEFGHIKLMNPQRSTVWY"`` = 0..19, ``X`` = 20, ``MASK`` = 21.

Fixes relative to the reference implementation (spec §9 item 7):

* per-protein recovery is averaged over that protein's *valid* residues, not over the padded length;
* refolding compares like with like: only the valid residues (mask True) of a design are folded, and the refolded
  CA trace is compared with the native CA of exactly those residues (the reference folded gap-closed chains and
  compared them with full-length native PDBs, which needs equal residue counts and silently broke on gaps).

RMSD here is over CA atoms after optimal superposition; the reference used PyRosetta's ``bb_rmsd`` (backbone
heavy atoms), which gives numbers of the same order but not identical ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reed import geometry
from reed.errors import DataError, ReedError

__all__ = [
    "ALPHABET",
    "MASK_TOKEN",
    "X_TOKEN",
    "ESMFoldRefolder",
    "RecoveryAccumulator",
    "kabsch",
    "parse_esmfold_output",
    "perplexity",
    "refold_metrics",
    "rmsd",
    "sequence_recovery",
    "tm_d0",
    "tm_score",
    "tokens_to_sequence",
]

ALPHABET = "ACDEFGHIKLMNPQRSTVWY"
X_TOKEN = 20
MASK_TOKEN = 21
# ESMFold / AlphaFold2 residue order: the folding model's input ids are indices into this string (X = 20).
_AF2_RESTYPES = "ARNDCQEGHILKMFPSTWYV"


def tokens_to_sequence(tokens: Tensor | np.ndarray | Sequence[int], mask: Tensor | np.ndarray | None = None) -> str:
    """Token ids (L,) -> one-letter string; X (20) and MASK (21) become ``"X"``. With ``mask``, only valid residues."""
    t = torch.as_tensor(tokens).reshape(-1).tolist()
    if mask is not None:
        m = torch.as_tensor(mask).reshape(-1)
        if m.numel() != len(t):
            raise DataError(f"tokens_to_sequence: mask has {m.numel()} entries but tokens has {len(t)}")
        t = [v for v, keep in zip(t, (m > 0).tolist()) if keep]
    out = []
    for v in t:
        if not 0 <= v <= MASK_TOKEN:
            raise DataError(f"tokens_to_sequence: token id {v} outside 0..{MASK_TOKEN}")
        out.append(ALPHABET[v] if v < X_TOKEN else "X")
    return "".join(out)


# ------------------------------------------------------------------------------------------------ sequence metrics


def _check_bl(pred: Tensor, native: Tensor, mask: Tensor, fn: str) -> tuple[Tensor, Tensor, Tensor]:
    pred, native, mask = torch.as_tensor(pred), torch.as_tensor(native), torch.as_tensor(mask)
    if native.dim() != 2:
        raise DataError(f"{fn}: native must be (B, L), got shape {tuple(native.shape)}")
    if pred.shape != native.shape:
        raise DataError(f"{fn}: pred shape {tuple(pred.shape)} != native shape {tuple(native.shape)}")
    if mask.shape != native.shape:
        raise DataError(f"{fn}: mask shape {tuple(mask.shape)} != native shape {tuple(native.shape)}")
    return pred, native, mask > 0


class RecoveryAccumulator:
    """Sequence recovery over many batches: ``update(pred, native, mask)`` per batch, ``compute()`` at the end.

    Keeps per-protein (matches, residues) counts, so the pooled value and the per-protein median/mean over
    everything seen are exact, independent of how proteins were split into batches.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._matches: list[int] = []
        self._counts: list[int] = []

    def update(self, pred: Tensor, native: Tensor, mask: Tensor) -> None:
        pred, native, valid = _check_bl(pred, native, mask, "RecoveryAccumulator.update")
        matches = ((pred == native) & valid).sum(dim=1).tolist()
        counts = valid.sum(dim=1).tolist()
        for m, c in zip(matches, counts):
            if c > 0:  # a protein without valid residues has no recovery; it is not counted
                self._matches.append(int(m))
                self._counts.append(int(c))

    def merge(self, other: RecoveryAccumulator) -> None:
        """Add the proteins another accumulator has seen (e.g. from another worker)."""
        self._matches.extend(other._matches)
        self._counts.extend(other._counts)

    def compute(self) -> dict[str, float]:
        if not self._counts:
            raise DataError("sequence recovery: no valid residues seen (every mask entry is 0)")
        matches = np.asarray(self._matches, dtype=np.float64)
        counts = np.asarray(self._counts, dtype=np.float64)
        per_protein = matches / counts
        return {
            "recovery": float(matches.sum() / counts.sum()),
            "recovery_median": float(np.median(per_protein)),
            "recovery_mean": float(per_protein.mean()),
            "num_residues": int(counts.sum()),
            "num_proteins": len(self._counts),
        }


def sequence_recovery(pred: Tensor, native: Tensor, mask: Tensor) -> dict[str, float]:
    """Recovery of ``native`` tokens by ``pred`` (both (B, L) int) over residues where ``mask`` is set.

    ``recovery`` pools all residues (Σ matches / Σ mask: the reference's residue-weighted sp_acc);
    ``recovery_median`` / ``recovery_mean`` are over proteins, each protein's recovery taken over its own valid
    residues. Proteins without valid residues are skipped.
    """
    acc = RecoveryAccumulator()
    acc.update(pred, native, mask)
    return acc.compute()


def perplexity(log_probs: Tensor, native: Tensor, mask: Tensor) -> dict[str, float]:
    """Perplexity exp(Σ NLL·m / Σ m), mean NLL and argmax accuracy over residues where ``mask`` is set.

    ``log_probs`` is (B, L, V); it is re-normalised with ``log_softmax`` (a no-op for log-probabilities), so raw
    logits give the same answer.
    """
    log_probs = torch.as_tensor(log_probs)
    native = torch.as_tensor(native)
    if log_probs.dim() != 3:
        raise DataError(f"perplexity: log_probs must be (B, L, V), got shape {tuple(log_probs.shape)}")
    _, native, valid = _check_bl(native, native, mask, "perplexity")
    if log_probs.shape[:2] != native.shape:
        raise DataError(f"perplexity: log_probs shape {tuple(log_probs.shape)} does not match native "
                        f"{tuple(native.shape)}")
    n = int(valid.sum())
    if n == 0:
        raise DataError("perplexity: mask has no valid residues")
    native = native.long()
    if int(native[valid].min()) < 0 or int(native[valid].max()) >= log_probs.shape[-1]:
        raise DataError(f"perplexity: native token ids outside 0..{log_probs.shape[-1] - 1}")
    lp = torch.log_softmax(log_probs.double(), dim=-1)
    nll = -lp.gather(-1, native.clamp(0, lp.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    mean_nll = float(nll[valid].sum() / n)
    correct = (lp.argmax(-1) == native) & valid
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "accuracy": float(correct.sum()) / n,
        "num_residues": n,
    }


# ------------------------------------------------------------------------------------------------ superposition


def _coords(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise DataError(f"{name} must be (N, 3) coordinates, got shape {a.shape}")
    if a.shape[0] == 0:
        raise DataError(f"{name} has no atoms")
    if not np.isfinite(a).all():
        raise DataError(f"{name} contains non-finite coordinates (missing atoms must be masked out first)")
    return a


def _pair(P: Any, Q: Any) -> tuple[np.ndarray, np.ndarray]:
    p, q = _coords(P, "P"), _coords(Q, "Q")
    if p.shape != q.shape:
        raise DataError(f"P and Q must have the same number of atoms, got {p.shape[0]} and {q.shape[0]}")
    return p, q


def kabsch(P: Tensor | np.ndarray, Q: Tensor | np.ndarray, weights: Tensor | np.ndarray | None = None):
    """Optimal proper rotation R (3, 3) and translation t (3,) with ``P @ R.T + t`` ≈ Q (weighted least squares).

    Returns torch tensors (dtype/device of P) when P is a tensor, numpy float64 arrays otherwise. det(R) = +1:
    reflections are never used.
    """
    p, q = _pair(P, Q)
    if weights is None:
        w = np.ones(p.shape[0])
    else:
        w = np.asarray(weights.detach().cpu().double() if isinstance(weights, Tensor) else weights, dtype=np.float64)
        w = w.reshape(-1)
        if w.shape[0] != p.shape[0]:
            raise DataError(f"kabsch: weights has {w.shape[0]} entries but P has {p.shape[0]} atoms")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise DataError("kabsch: weights must be finite, non-negative and not all zero")
    R, t = geometry.kabsch(p, q, w)
    if isinstance(P, Tensor):
        dtype = P.dtype if P.is_floating_point() else torch.float32
        return torch.as_tensor(R, dtype=dtype, device=P.device), torch.as_tensor(t, dtype=dtype, device=P.device)
    return R, t


def rmsd(P: Tensor | np.ndarray, Q: Tensor | np.ndarray, align: bool = True) -> float:
    """Root-mean-square deviation between (N, 3) coordinate sets, after optimal superposition of P on Q if
    ``align``."""
    p, q = _pair(P, Q)
    return float(geometry.rmsd(p, q, align=align))


def tm_d0(L: int) -> float:
    """TM-score distance scale d0(L) = 1.24·(L − 15)^(1/3) − 1.8 Å, floored at 0.5 Å (as the TM-score program)."""
    if L <= 15:
        return 0.5
    return max(1.24 * (L - 15) ** (1.0 / 3.0) - 1.8, 0.5)


def _tm_search(p: np.ndarray, q: np.ndarray, L_norm: int, max_seeds_per_length: int = 200,
               max_iter: int = 20) -> tuple[float, np.ndarray, np.ndarray]:
    """Maximise the TM-score of p (model) against q (target) over rigid superpositions.

    The TM-score program's heuristic, vectorised over seeds: fragments of length N, N/2, N/4, … (down to 4) at
    every start (strided when there are many) are superposed; each seed then iterates "superpose on the residues
    closer than the search cutoff, re-select" until the selection is stable. Every superposition visited is
    scored; the best is returned as (score, R, t).
    """
    n = p.shape[0]
    d0 = tm_d0(L_norm)
    d0_search = min(max(d0, 4.5), 8.0)
    inv_d0_sq = 1.0 / (d0 * d0)

    lengths, length = [], n
    while True:
        lengths.append(length)
        nxt = length // 2
        if nxt < 4 or nxt == length:
            break
        length = nxt
    rows = []
    for length in lengths:
        starts = np.arange(0, n - length + 1)
        if len(starts) > max_seeds_per_length:
            starts = np.unique(np.linspace(0, n - length, max_seeds_per_length).round().astype(int))
        for s in starts:
            w = np.zeros(n)
            w[s : s + length] = 1.0
            rows.append(w)
    seeds = np.stack(rows)

    best = (-1.0, np.eye(3), np.zeros(3))
    k_min = min(3, n)
    # Two selection cutoffs, as the TM-score program's search and its tighter first pass use.
    for cutoff in (d0_search, max(d0_search - 1.0, d0)):
        W = seeds.copy()
        for _ in range(max_iter):
            R, t = geometry.kabsch(p, q, W)
            x = np.einsum("ni,sji->snj", p, R) + t[:, None, :]
            d2 = ((x - q[None]) ** 2).sum(-1)  # (S, N)
            scores = (1.0 / (1.0 + d2 * inv_d0_sq)).sum(axis=1) / L_norm
            i = int(scores.argmax())
            if scores[i] > best[0]:
                best = (float(scores[i]), R[i], t[i])
            new = d2 < cutoff * cutoff
            short = new.sum(axis=1) < k_min
            if short.any():  # widen the cutoff for those seeds: keep at least the 3 closest residues
                kth = np.partition(d2[short], k_min - 1, axis=1)[:, k_min - 1 : k_min]
                new[short] = d2[short] <= kth
            new = new.astype(np.float64)
            changed = (new != W).any(axis=1)
            if not changed.any():
                break
            W = new[changed] if changed.sum() < W.shape[0] else new
    return best


def tm_score(P: Tensor | np.ndarray, Q: Tensor | np.ndarray, L_target: int | None = None) -> float:
    """TM-score of model P against target Q: residue-matched (N, 3) CA coordinates of equal length.

    TM = max over superpositions of (1/L) Σ_i 1 / (1 + (d_i/d0)²), d0 = 1.24·(L−15)^(1/3) − 1.8 (≥ 0.5),
    with L = ``L_target`` (default N, the number of residue pairs). Invariant to rigid motions of P; 1.0 for
    identical structures.
    """
    p, q = _pair(P, Q)
    L = p.shape[0] if L_target is None else int(L_target)
    if L < 1:
        raise DataError(f"tm_score: L_target must be >= 1, got {L_target}")
    return _tm_search(p, q, L)[0]


# ------------------------------------------------------------------------------------------------ refolding


def _esmfold_missing_message(model: str, detail: str) -> str:
    return (
        f"ESMFold weights not found at {model!r} ({detail}). Download them on a machine with internet access, e.g. "
        f"`huggingface-cli download facebook/esmfold_v1 --local-dir <dir>` or "
        f"`python -c \"from transformers import EsmForProteinFolding, AutoTokenizer; "
        f"EsmForProteinFolding.from_pretrained('facebook/esmfold_v1'); AutoTokenizer.from_pretrained("
        f"'facebook/esmfold_v1')\"` to fill the Hugging Face cache, then pass that directory (or keep the hub id with "
        f"the cache in place)."
    )


class ESMFoldRefolder:
    """Folds designed sequences with ESMFold (transformers ``EsmForProteinFolding`` + ``AutoTokenizer``).

    ``model`` is a hub id (resolved through the local Hugging Face cache when offline) or a local directory saved
    with ``save_pretrained``. ``X`` in a sequence is folded as alanine (as the reference). Sequences are folded in
    batches of ``batch_size`` (longest first, padded); ``num_recycles=None`` uses the model's ``max_recycles``.

    :meth:`fold` returns per sequence ``{"ca": (L, 3), "backbone": (L, 4, 3) N/CA/C/O, "plddt": mean pLDDT
    (0–100, over existing atoms as ESMFold's own mean), "plddt_per_residue": (L,) CA pLDDT (0–100), "ptm": float,
    "sequence": str folded}``.
    """

    def __init__(self, model: str = "facebook/esmfold_v1", device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, *, batch_size: int = 1, num_recycles: int | None = None,
                 chunk_size: int | None = None):
        from transformers import AutoTokenizer, EsmForProteinFolding

        model = str(model)
        self.model_name = model
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ReedError(f"ESMFoldRefolder: batch_size must be >= 1, got {batch_size}")
        self.num_recycles = num_recycles
        # A hub id is "name" or "org/name"; anything else (or an existing path) is a local directory.
        looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).expanduser().exists()
        if looks_local and not Path(model).expanduser().is_dir():
            raise ReedError(_esmfold_missing_message(model, "no such directory"))
        src = str(Path(model).expanduser()) if looks_local else model
        try:
            net = EsmForProteinFolding.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise ReedError(_esmfold_missing_message(model, f"{type(e).__name__}: {e}".splitlines()[0])) from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise ReedError(
                _esmfold_missing_message(model, f"tokenizer failed: {type(e).__name__}: {e}".splitlines()[0])
            ) from e
        ids = self.tokenizer.convert_tokens_to_ids(list(_AF2_RESTYPES) + ["X"])
        if ids != list(range(21)):
            raise ReedError(
                f"tokenizer at {model!r} does not use ESMFold's residue order ({_AF2_RESTYPES}+X -> 0..20); got "
                f"{ids}. Use the tokenizer shipped with facebook/esmfold_v1, not an ESM-2 language-model tokenizer."
            )
        if dtype is not None:
            net = net.to(dtype)
        elif self.device.type == "cpu":
            net = net.float()  # the fp16 ESM stem is for GPUs; half precision on CPU is slow or unsupported
        elif net.config.esmfold_config.fp16_esm:
            net.esm.half()
        if chunk_size is not None:
            net.trunk.set_chunk_size(chunk_size)
        self.model = net.to(self.device).eval().requires_grad_(False)

    @staticmethod
    def _clean(seq: str, i: int) -> str:
        if not isinstance(seq, str):
            raise DataError(f"sequence {i} is {type(seq).__name__}, expected a one-letter string")
        s = seq.strip().upper()
        if not s:
            raise DataError(f"sequence {i} is empty")
        bad = sorted(set(s) - set(_AF2_RESTYPES) - {"X"})
        if bad:
            raise DataError(f"sequence {i} contains letters outside the 20 amino acids and X: {''.join(bad)}")
        return s.replace("X", "A")

    def fold(self, sequences: list[str]) -> list[dict]:
        if isinstance(sequences, str):
            raise DataError("ESMFoldRefolder.fold expects a list of sequences, got a single string")
        seqs = [self._clean(s, i) for i, s in enumerate(sequences)]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        results: list[dict | None] = [None] * len(seqs)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            batch = [seqs[i] for i in idx]
            for i, out in zip(idx, self._fold_batch(batch)):
                results[i] = out
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _fold_batch(self, seqs: list[str]) -> list[dict]:
        L = max(len(s) for s in seqs)
        input_ids = torch.zeros(len(seqs), L, dtype=torch.long)
        attention = torch.zeros(len(seqs), L, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids = self.tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(ids) != len(s):
                raise DataError(f"tokenizer of {self.model_name!r} gave {len(ids)} ids for a {len(s)}-residue sequence")
            input_ids[j, : len(s)] = torch.tensor(ids)
            attention[j, : len(s)] = 1
        # Padding uses id 0 (alanine) with attention 0, as ESMFold's own batching; pad ids past X would index
        # past the residue tables of the structure module.
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                         num_recycles=self.num_recycles)
        return parse_esmfold_output(out, [len(s) for s in seqs], seqs)


def parse_esmfold_output(out: Any, lengths: list[int], sequences: list[str] | None = None) -> list[dict]:
    """Per-protein results from an ``EsmForProteinFoldingOutput`` (or a dict with the same fields).

    Uses ``positions`` (structure-module blocks, B, L, 14, 3; atom14 order N, CA, C, O, CB, …: the last block is
    the prediction), ``plddt`` (B, L, 37) in 0–1 and ``atom37_atom_exists`` (B, L, 37).
    """
    get = out.__getitem__ if isinstance(out, dict) else lambda k: getattr(out, k)
    pos = get("positions")
    if pos.dim() != 5 or pos.shape[-2:] != (14, 3):
        raise DataError(f"ESMFold output 'positions' must be (blocks, B, L, 14, 3), got {tuple(pos.shape)}")
    pos = pos[-1].detach().float().cpu()
    plddt = get("plddt").detach().float().cpu()
    exists = get("atom37_atom_exists").detach().float().cpu()
    if plddt.shape[:2] != pos.shape[:2] or exists.shape != plddt.shape:
        raise DataError(f"ESMFold output shapes disagree: positions {tuple(pos.shape)}, plddt {tuple(plddt.shape)}, "
                        f"atom37_atom_exists {tuple(exists.shape)}")
    if len(lengths) != pos.shape[0]:
        raise DataError(f"ESMFold output has {pos.shape[0]} proteins, expected {len(lengths)}")
    scale = 100.0 if float(plddt.max()) <= 1.0 + 1e-6 else 1.0  # transformers reports pLDDT in 0–1
    try:
        ptm_logits = get("ptm_logits")
    except (KeyError, AttributeError):
        ptm_logits = None
    results = []
    for j, n in enumerate(lengths):
        e = exists[j, :n]
        p = plddt[j, :n]
        mean = float((p * e).sum() / e.sum().clamp_min(1.0)) * scale
        res = {
            "ca": pos[j, :n, 1].numpy().astype(np.float64),
            "backbone": pos[j, :n, :4].numpy().astype(np.float64),
            "plddt": mean,
            "plddt_per_residue": (p[:, 1] * scale).numpy().astype(np.float64),
        }
        if ptm_logits is not None:
            res["ptm"] = _ptm(ptm_logits[j, :n, :n].detach().float().cpu())
        if sequences is not None:
            res["sequence"] = sequences[j]
        results.append(res)
    return results


def _ptm(logits: Tensor, max_bin: float = 31.0) -> float:
    """Predicted TM-score of one protein from its (n, n, bins) aligned-error logits (AlphaFold2's pTM).

    Computed per protein over its own residues: the model's batched ``ptm`` field is a single value for the whole
    batch and includes padding.
    """
    n, bins = logits.shape[0], logits.shape[-1]
    edges = torch.linspace(0.0, max_bin, bins - 1)
    step = edges[1] - edges[0]
    centers = torch.cat([edges + step / 2, (edges[-1] + 1.5 * step).reshape(1)])
    d0 = 1.24 * (max(n, 19) - 15) ** (1.0 / 3.0) - 1.8
    per_pair = (logits.softmax(-1) * (1.0 / (1.0 + (centers / d0) ** 2))).sum(-1)  # (n, n)
    return float(per_pair.mean(-1).max())


def refold_metrics(designs: list[str], natives_ca: list[np.ndarray], masks: list[np.ndarray], refolder) -> dict:
    """Self-consistency of designs: fold each design's valid residues and compare with the native structure.

    ``designs[i]`` is a one-letter string over the full chain (length L_i, MASK/X allowed as ``X``, folded as A),
    ``natives_ca[i]`` the (L_i, 3) native CA coordinates and ``masks[i]`` (L_i,) the valid residues (resolved
    coordinates). Only residues with mask True are folded, and the refolded CA trace is compared with the native
    CA of the same residues, so counts match by construction. ``refolder`` is anything with
    ``fold(list[str]) -> list[{"ca": (n, 3), "plddt": float}]`` (e.g. :class:`ESMFoldRefolder`).

    Returns per-protein lists ``rmsd`` (CA, after superposition), ``tm`` (TM-score, L = valid residues),
    ``plddt``, ``num_residues`` and aggregates ``rmsd_mean``, ``rmsd_median``, ``frac_rmsd_below_2``, ``tm_mean``,
    ``tm_median``, ``plddt_mean``, ``plddt_median``, ``frac_plddt_above_80``, ``num_proteins``.
    """
    if not (len(designs) == len(natives_ca) == len(masks)):
        raise DataError(f"refold_metrics: {len(designs)} designs, {len(natives_ca)} native structures and "
                        f"{len(masks)} masks; they must match one to one")
    if len(designs) == 0:
        raise DataError("refold_metrics: no designs given")
    seqs, natives = [], []
    for i, (design, ca, mask) in enumerate(zip(designs, natives_ca, masks)):
        if isinstance(design, (Tensor, np.ndarray)):
            design = tokens_to_sequence(design)
        ca = ca.detach().cpu().double().numpy() if isinstance(ca, Tensor) else np.asarray(ca, dtype=np.float64)
        m = (mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)).reshape(-1).astype(bool)
        if ca.ndim != 2 or ca.shape[1] != 3:
            raise DataError(f"refold_metrics: natives_ca[{i}] must be (L, 3), got shape {ca.shape}")
        if not (len(design) == ca.shape[0] == m.shape[0]):
            raise DataError(f"refold_metrics: protein {i}: design has {len(design)} residues, native CA "
                            f"{ca.shape[0]}, mask {m.shape[0]}; give full-length designs with their mask")
        if not m.any():
            raise DataError(f"refold_metrics: protein {i} has no valid residues in its mask")
        if not np.isfinite(ca[m]).all():
            raise DataError(f"refold_metrics: protein {i}: native CA coordinates are missing (non-finite) at "
                            "residues the mask marks valid")
        seq = "".join(c for c, keep in zip(design, m) if keep).upper().replace("X", "A")
        seqs.append(seq)
        natives.append(ca[m])
    folded = refolder.fold(seqs)
    if len(folded) != len(seqs):
        raise DataError(f"refold_metrics: the refolder returned {len(folded)} structures for {len(seqs)} sequences")
    rmsds, tms, plddts, sizes = [], [], [], []
    for i, (res, native) in enumerate(zip(folded, natives)):
        pred = res["ca"]
        pred = pred.detach().cpu().double().numpy() if isinstance(pred, Tensor) else np.asarray(pred, np.float64)
        if pred.shape != native.shape:
            raise DataError(f"refold_metrics: protein {i}: refolded CA has shape {pred.shape}, native valid CA "
                            f"{native.shape}")
        rmsds.append(rmsd(pred, native))
        tms.append(tm_score(pred, native))
        plddts.append(float(res["plddt"]))
        sizes.append(int(native.shape[0]))
    r, t, p = np.asarray(rmsds), np.asarray(tms), np.asarray(plddts)
    return {
        "rmsd": rmsds,
        "tm": tms,
        "plddt": plddts,
        "num_residues": sizes,
        "rmsd_mean": float(r.mean()),
        "rmsd_median": float(np.median(r)),
        "frac_rmsd_below_2": float((r < 2.0).mean()),
        "tm_mean": float(t.mean()),
        "tm_median": float(np.median(t)),
        "plddt_mean": float(p.mean()),
        "plddt_median": float(np.median(p)),
        "frac_plddt_above_80": float((p > 80.0).mean()),
        "num_proteins": len(rmsds),
    }
