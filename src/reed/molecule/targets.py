"""Per-molecule (and per-atom) alignment targets for REED on 3D molecules (spec ``molecule.md`` §2.1, §3, §7).

Two target encoders and one store:

1. :func:`fit_molecule_encoder` / :class:`FittedMoleculeEncoder`: an E(3)-invariant encoder pretrained on the user's
   own molecules, so REED runs fully offline. The network is the library's EGNN (:class:`MoleculeDenoiser` with
   ``arch="egnn"``, no self-conditioning) and the objective is Frad/UniMol-like in spirit:

   * coordinate denoising: each step the molecules are centred, rotated by a Haar-uniform rotation, and perturbed
     with ``N(0, noise²)`` Gaussian noise (Å); the network predicts the clean (centred) coordinates equivariantly
     (MSE over real atoms, in units of the data's coordinate std);
   * masked atom-type prediction: a fraction ``mask_prob`` of the real atoms get a dedicated ``[MASK]`` type and
     the network predicts their element (cross-entropy).

   The representation is the final layer's node features on *clean* inputs in eval mode: per atom ``(n, D)`` and
   their mean over real atoms only ``(D,)``. It depends on inter-atomic distances and types only, so it is invariant
   to rotations, translations, atom order and padding (no padding leak, unlike the reference, spec §7.1-7.2).

2. :class:`UniMolEncoder`: the pretrained UniMol v1 (all-H, 512-d) through the optional ``unimol_tools`` package
   (``UniMolRepr``), from local weight files (no downloads). Pooling is done here over the real atoms only (default
   ``pooling="mean"``): BOS/EOS and padding never enter (spec §7.2). ``"cls"`` returns UniMol's CLS-token vector and
   ``"sum_std"`` the reference's plain-UniMol recipe (sum over atoms, then per-sample standardisation, §2.1).
   ``unimol_tools`` builds edge types as ``tok_i * len(dictionary) + tok_j`` with the ``[MASK]`` token included
   (31 for the standard dictionary), i.e. consistently with pretraining (the reference's hard-coded 32, §7.3, does
   not arise). The weight files are checked to exist before anything is built, but note that ``unimol_tools`` loads
   the state dict with ``strict=False`` like the reference (§7.13): use the official checkpoint files, or layers
   missing from a different checkpoint would stay randomly initialised. The paper's ``unimol_global`` checkpoint (a
   global head trained on GEOM) is a different model that ``unimol_tools`` cannot load.

3. :func:`store_molecule_targets`: the pooled targets in the generic target store (:mod:`reed.store`), what
   training reads. :func:`embed_molecules` / :func:`load_molecule_targets`: one ``.npz`` file per target set that
   can also hold per-atom targets (ragged ``(n_i, D)`` rows, which the fixed-shape generic store cannot), aligned
   with a data set's order and validated on load (count, :func:`dataset_fingerprint`, finite values).

File layout written by :func:`embed_molecules`::

    pooled       (N, D)        float32   per-molecule targets, row i = dataset[i]
    atoms        (sum n_i, D)  float16   optional per-atom targets (float32 if float16 would overflow)
    offsets      (N + 1,)      int64     atoms of molecule i are atoms[offsets[i]:offsets[i + 1]]
    fingerprint  ()            str       dataset_fingerprint(dataset)
    encoder      ()            str       description of the encoder
    format, version                      "reed-molecule-targets", 1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reed.errors import CheckpointError, ConfigError, DataError, ReedError
from reed.geometry import center
from reed.io import atomic_savez, atomic_write_bytes, atomic_write_text, progress_bar, read_npz
from reed.molecule.batch import MoleculeBatch, collate, uniform_rotation
from reed.molecule.chem import Molecule
from reed.molecule.dataset import MoleculeDataset
from reed.molecule.nets import MoleculeDenoiser, masked_mean_pool
from reed.store import TargetStore, TargetStoreWriter, check_target_values

__all__ = [
    "FittedMoleculeEncoder",
    "MoleculeEncoderConfig",
    "UniMolEncoder",
    "dataset_fingerprint",
    "embed_molecules",
    "fit_molecule_encoder",
    "load_molecule_targets",
]

ENCODER_KIND = "reed.molecule_encoder"
ENCODER_VERSION = 1
WEIGHTS_NAME = "encoder.safetensors"
CONFIG_NAME = "encoder.json"
TARGETS_FORMAT = "reed-molecule-targets"
TARGETS_VERSION = 1
_FP16_MAX = 65000.0


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprint and small helpers
# ----------------------------------------------------------------------------------------------------------------------
def _molecules(dataset) -> list[Molecule]:
    if isinstance(dataset, MoleculeDataset):
        return dataset.molecules
    return list(dataset)


def dataset_fingerprint(dataset) -> str:
    """SHA-256 (hex) of a data set's molecules in order: atom counts, atomic numbers and coordinates rounded to 1e-3 Å.

    Bonds, charges, SMILES and the element vocabulary are not included (targets depend on the geometry and the
    elements only). Accepts a :class:`MoleculeDataset` or a sequence of :class:`Molecule`.
    """
    mols = _molecules(dataset)
    h = hashlib.sha256(b"reed-molecule-fingerprint-v1")
    counts = np.array([m.num_atoms for m in mols], dtype=np.int64)
    h.update(np.int64(len(mols)).tobytes())
    h.update(counts.tobytes())
    if mols and counts.sum() > 0:
        atoms = np.concatenate([m.atoms for m in mols]).astype(np.int64)
        coords = np.concatenate([m.coords for m in mols]).astype(np.float64)
        h.update(atoms.tobytes())
        h.update(np.rint(coords * 1000.0).astype(np.int64).tobytes())
    return h.hexdigest()


def _batches_by_atoms(sizes: np.ndarray, order: Sequence[int], batch_atoms: int) -> Iterator[list[int]]:
    """Consecutive chunks of ``order`` whose padded size ``len(chunk) * max(n)`` stays within ``batch_atoms``
    (a molecule larger than the budget forms a batch on its own)."""
    chunk: list[int] = []
    n_max = 0
    for i in order:
        n = int(sizes[i])
        if chunk and (len(chunk) + 1) * max(n_max, n) > batch_atoms:
            yield chunk
            chunk, n_max = [], 0
        chunk.append(int(i))
        n_max = max(n_max, n)
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------------------------------
# Fitted encoder
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class MoleculeEncoderConfig:
    """Settings of :func:`fit_molecule_encoder`.

    Attributes:
        hidden: node feature width D (the target dimension).
        layers: EGNN message-passing layers; the representation is taken after the last one.
        noise: std (Å) of the Gaussian coordinate noise of the denoising objective.
        mask_prob: fraction of real atoms whose type is replaced by ``[MASK]`` and predicted.
        steps: optimiser steps.
        batch_atoms: padded atoms per training batch (``batch size * largest molecule``); at least one molecule.
        lr: peak learning rate (AdamW, linear warm-up over ``min(100, steps // 10)`` steps, cosine decay to 10%).
        seed: seeds the initial weights, batch order, rotations, noise and masks (deterministic on CPU).
        d_edge: width of the EGNN edge features.
        use_bonds: feed the data set's bond classes as edge inputs (default off: geometry and elements only, like
            UniMol/Frad; bonds inferred from coordinates can be unreliable).
        type_weight: weight of the masked-type cross-entropy relative to the coordinate loss.
        log_every: log the mean losses every this many steps (0: ``max(1, steps // 20)``).
        probe_max: at most this many molecules for the ridge-regression sanity probe (0 disables it).
    """

    hidden: int = 128
    layers: int = 4
    noise: float = 0.3
    mask_prob: float = 0.15
    steps: int = 2000
    batch_atoms: int = 4096
    lr: float = 1e-3
    seed: int = 0
    d_edge: int = 64
    use_bonds: bool = False
    type_weight: float = 1.0
    log_every: int = 0
    probe_max: int = 5000

    def validate(self) -> None:
        checks = [
            ("hidden", self.hidden >= 1), ("layers", self.layers >= 1), ("noise", self.noise > 0),
            ("mask_prob", 0.0 <= self.mask_prob < 1.0), ("steps", self.steps >= 1),
            ("batch_atoms", self.batch_atoms >= 1), ("lr", self.lr > 0 and math.isfinite(self.lr)),
            ("d_edge", self.d_edge >= 1), ("type_weight", self.type_weight >= 0), ("log_every", self.log_every >= 0),
            ("probe_max", self.probe_max >= 0),
        ]  # fmt: skip
        bad = [name for name, ok in checks if not ok]
        if bad:
            vals = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            raise ConfigError(
                f"MoleculeEncoderConfig: invalid value(s) {vals} (hidden, layers, steps, batch_atoms, d_edge >= 1; "
                "noise, lr > 0; 0 <= mask_prob < 1; type_weight, log_every, probe_max >= 0)"
            )

    @classmethod
    def from_dict(cls, d: dict) -> MoleculeEncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"MoleculeEncoderConfig: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


def _build_net(num_elements: int, cfg: MoleculeEncoderConfig, max_atoms: int) -> MoleculeDenoiser:
    # One extra type index (num_elements) is the [MASK] token.
    return MoleculeDenoiser(
        num_elements + 1, arch="egnn", hidden=cfg.hidden, layers=cfg.layers, d_edge=cfg.d_edge,
        size_emb=16, max_atoms=max_atoms, self_condition=False,
    )  # fmt: skip


class FittedMoleculeEncoder(nn.Module):
    """A frozen encoder produced by :func:`fit_molecule_encoder` (load it with :meth:`load`).

    Attributes:
        dim: feature width D.
        elements: the vocabulary the encoder was fitted with; ``batch.atom_types`` must index it (collate with
            ``collate(molecules, encoder.elements)``, or call :meth:`encode`).
        coord_std: the data's coordinate std (Å) used to normalise coordinates.
        description: a one-line description (stored with embedded targets).
    """

    def __init__(self, net: MoleculeDenoiser, elements: Sequence[str], coord_std: float, *, use_bonds: bool = False,
                 description: str = "reed fitted molecule encoder"):
        super().__init__()
        self.net = net
        self.elements = tuple(elements)
        self.coord_std = float(coord_std)
        self.use_bonds = bool(use_bonds)
        self.dim = int(net.hidden_size)
        self.description = description
        self.mask_token = len(self.elements)

    def features(self, x: Tensor, types: Tensor, bonds: Tensor, mask: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Network pass on coordinates in Å: returns the predictions and the last layer's node features (B, N, D)."""
        mask = mask.bool()
        if not self.use_bonds:
            bonds = torch.zeros_like(bonds)
        t = x.new_zeros(x.shape[0])
        pred, hidden = self.net(x / self.coord_std, types, bonds, t, mask, taps=(self.net.depth,))
        return pred, hidden[self.net.depth] * mask.unsqueeze(-1).to(x.dtype)

    def forward(self, batch: MoleculeBatch) -> tuple[Tensor, Tensor]:
        """``batch`` (coordinates in Å, types indexing :attr:`elements`) -> ``(pooled (B, D), per_atom (B, N, D))``;
        ``pooled`` is the mean over real atoms, ``per_atom`` is exactly 0 at padding."""
        mask = batch.mask.bool()
        types = batch.atom_types
        if mask.any():
            real = types[mask]
            if int(real.min()) < 0 or int(real.max()) >= len(self.elements):
                raise DataError(
                    f"FittedMoleculeEncoder: atom type index {int(real.max())} outside the encoder's vocabulary "
                    f"{self.elements} (collate with encoder.elements)"
                )
        types = types.masked_fill(~mask, 0)
        _, h = self.features(batch.x.float(), types, batch.bonds, mask)
        return masked_mean_pool(h, mask), h

    @torch.no_grad()
    def encode(self, molecules: Sequence[Molecule], device=None) -> tuple[Tensor, Tensor, Tensor]:
        """Collate ``molecules`` with :attr:`elements` and run :meth:`forward` (no grad). Returns
        ``(pooled, per_atom, mask)``."""
        device = device if device is not None else next(self.parameters()).device
        batch = collate(list(molecules), self.elements, device=device)
        pooled, h = self(batch)
        return pooled, h, batch.mask

    @classmethod
    def load(cls, out_dir, device="cpu") -> FittedMoleculeEncoder:
        """Load ``encoder.json`` + ``encoder.safetensors`` written by :func:`fit_molecule_encoder`: eval mode, frozen.

        Raises CheckpointError naming the file when either is missing, unreadable, of the wrong kind, or when the
        weights do not match the stored config or checksum.
        """
        from safetensors.torch import load_file

        out_dir = Path(out_dir)
        j_path, w_path = out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME
        for p in (j_path, w_path):
            if not p.is_file():
                raise CheckpointError(f"{p}: not found (fit an encoder with fit_molecule_encoder into {out_dir})")
        try:
            meta = json.loads(j_path.read_text())
        except Exception as exc:
            raise CheckpointError(f"{j_path}: unreadable json ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("kind") != ENCODER_KIND:
            kind = meta.get("kind") if isinstance(meta, dict) else None
            raise CheckpointError(f"{j_path}: not a {ENCODER_KIND} file (kind={kind!r})")
        try:
            cfg = MoleculeEncoderConfig.from_dict(meta["config"])
            elements = tuple(meta["elements"])
            coord_std = float(meta["coord_std"])
            max_atoms = int(meta["max_atoms"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{j_path}: missing or bad field ({exc})") from exc
        digest = hashlib.sha256(w_path.read_bytes()).hexdigest()
        if meta.get("weights_sha256") and meta["weights_sha256"] != digest:
            raise CheckpointError(f"{w_path}: checksum {digest[:12]}… does not match {j_path} "
                                  f"({meta['weights_sha256'][:12]}…); the files belong to different fits")
        try:
            state = load_file(str(w_path))
        except Exception as exc:
            raise CheckpointError(f"{w_path}: corrupt or unreadable safetensors file ({exc})") from exc
        net = _build_net(len(elements), cfg, max_atoms)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{w_path}: weights do not fit the config in {j_path} ({exc})") from exc
        enc = cls(net, elements, coord_std, use_bonds=cfg.use_bonds, description=meta.get("description", ENCODER_KIND))
        enc.eval().requires_grad_(False)
        return enc.to(device)


def _coord_std(mols: Sequence[Molecule]) -> float:
    """Std of the centred coordinate components over all atoms (Å)."""
    total, count = 0.0, 0
    for m in mols:
        if m.num_atoms:
            c = m.coords.astype(np.float64)
            c = c - c.mean(axis=0)
            total += float((c * c).sum())
            count += 3 * m.num_atoms
    std = math.sqrt(total / count) if count else 1.0
    return std if std > 1e-6 else 1.0


class _RandomBatches:
    """Endless batches: a fresh permutation per epoch, cut into chunks of at most ``batch_atoms`` padded atoms."""

    def __init__(self, sizes: np.ndarray, batch_atoms: int, seed: int):
        self.sizes, self.batch_atoms = sizes, batch_atoms
        self.rng = np.random.default_rng(seed)
        self._it: Iterator[list[int]] = iter(())

    def __next__(self) -> list[int]:
        for _ in range(2):
            try:
                return next(self._it)
            except StopIteration:
                self._it = _batches_by_atoms(self.sizes, self.rng.permutation(len(self.sizes)), self.batch_atoms)
        raise RuntimeError("empty data set")


def _lr_factor(step: int, total: int) -> float:
    warm = min(100, total // 10)
    if step < warm:
        return (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def _ridge_r2(X: np.ndarray, y: np.ndarray, seed: int = 0, alpha: float = 1.0) -> float | None:
    """Held-out R² (20%) of a ridge regression on standardised features; None if too few samples or no variance."""
    n = len(y)
    if n < 20:
        return None
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(4, n // 5)
    te, tr = perm[:n_test], perm[n_test:]
    X = X.astype(np.float64)
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-8
    Xs = (X - mu) / sd
    ym = y[tr].mean()
    A = Xs[tr]
    w = np.linalg.solve(A.T @ A + alpha * np.eye(A.shape[1]), A.T @ (y[tr] - ym))
    pred = Xs[te] @ w + ym
    ss_tot = float(((y[te] - y[te].mean()) ** 2).sum())
    if ss_tot <= 0:
        return None
    return 1.0 - float(((y[te] - pred) ** 2).sum()) / ss_tot


@torch.no_grad()
def _embed_fitted(enc: FittedMoleculeEncoder, mols: Sequence[Molecule], batch_atoms: int, device, per_atom: bool,
                  progress: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
    sizes = np.array([m.num_atoms for m in mols], dtype=np.int64)
    order = np.argsort(sizes, kind="stable")
    pooled = np.zeros((len(mols), enc.dim), dtype=np.float32)
    atoms: list[np.ndarray | None] = [None] * len(mols) if per_atom else []
    chunks = list(_batches_by_atoms(sizes, order, batch_atoms))
    for chunk in progress_bar(chunks, progress, "embed molecules"):
        p, h, mask = enc.encode([mols[i] for i in chunk], device=device)
        p, h, mask = p.float().cpu().numpy(), h.float().cpu().numpy(), mask.cpu().numpy()
        for k, i in enumerate(chunk):
            pooled[i] = p[k]
            if per_atom:
                atoms[i] = h[k, mask[k]]
    return pooled, (atoms if per_atom else None)  # type: ignore[return-value]


def fit_molecule_encoder(
    dataset: MoleculeDataset,
    out_dir,
    cfg: MoleculeEncoderConfig | None = None,
    *,
    progress: bool = True,
    device="cpu",
) -> dict:
    """Pretrain an invariant molecule encoder on ``dataset`` (denoising + masked types) and save it to ``out_dir``.

    Each step: a random batch of at most ``cfg.batch_atoms`` padded atoms, centred and rotated by independent
    Haar-uniform rotations; ``N(0, cfg.noise²)`` Å noise on the coordinates; ``cfg.mask_prob`` of the real atoms
    typed ``[MASK]``. Loss = MSE(predicted clean coords, clean coords) in units of the data's coordinate std
    + ``cfg.type_weight`` · CE(types at masked atoms). Deterministic given ``cfg.seed`` (on CPU).

    Writes ``out_dir/encoder.safetensors`` and ``out_dir/encoder.json`` (atomically, the json last) and returns the
    report that the json holds: ``config``, ``elements``, ``coord_std`` (Å), ``data_fingerprint``, ``history``
    (logged mean losses: ``loss``, ``denoise_mse`` in Å², ``identity_mse`` the MSE of returning the noisy input,
    ``denoise_ratio`` their ratio (< 1 once it denoises), ``type_ce``, ``type_acc``), ``first``/``final``
    (the first/last logged entries), ``probe`` (held-out R² of a ridge regression from the pooled embedding to the
    atom count and to the radius of gyration; None if fewer than 20 molecules) and ``embedding_stats``.
    """
    cfg = cfg if cfg is not None else MoleculeEncoderConfig()
    if not isinstance(cfg, MoleculeEncoderConfig):
        raise ConfigError(f"fit_molecule_encoder: cfg must be a MoleculeEncoderConfig, got {type(cfg).__name__}")
    cfg.validate()
    if not isinstance(dataset, MoleculeDataset):
        raise DataError(f"fit_molecule_encoder: expected a MoleculeDataset, got {type(dataset).__name__}")
    mols = dataset.molecules
    sizes = dataset.num_atoms
    if len(mols) == 0 or int(sizes.max()) < 2:
        raise DataError(f"fit_molecule_encoder: data set {dataset.name!r} needs molecules with at least 2 atoms")
    if int(sizes.min()) < 1:
        raise DataError(f"fit_molecule_encoder: molecule {int(np.argmin(sizes))} of {dataset.name!r} has no atoms")
    device = torch.device(device)
    out_dir = Path(out_dir)
    elements = dataset.elements
    K = len(elements)
    coord_std = _coord_std(mols)
    max_atoms = max(256, int(sizes.max()) + 1)
    fp = dataset_fingerprint(dataset)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = _build_net(K, cfg, max_atoms)
    enc = FittedMoleculeEncoder(net, elements, coord_std, use_bonds=cfg.use_bonds).to(device)
    enc.train()
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps))
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    batches = _RandomBatches(sizes, cfg.batch_atoms, cfg.seed)
    sigma = cfg.noise / coord_std
    log_every = cfg.log_every or max(1, cfg.steps // 20)

    history: list[dict] = []
    acc = {"loss": 0.0, "denoise_mse": 0.0, "identity_mse": 0.0, "type_ce": 0.0, "type_acc": 0.0, "n": 0}
    steps = progress_bar(range(cfg.steps), progress, "fit molecule encoder")
    for step in steps:
        idx = next(batches)
        batch = collate([mols[i] for i in idx], elements, device=device)
        mask = batch.mask
        maskf = mask.to(torch.float32).unsqueeze(-1)
        rot = uniform_rotation(len(idx), gen, device=device)
        x = torch.einsum("bij,bnj->bni", rot, batch.x) * maskf
        x_noisy = x + torch.randn(x.shape, generator=gen, device=device) * cfg.noise * maskf
        masked = (torch.rand(mask.shape, generator=gen, device=device) < cfg.mask_prob) & mask
        types_in = torch.where(masked, torch.full_like(batch.atom_types, enc.mask_token), batch.atom_types)
        pred, _ = enc.features(x_noisy, types_in, batch.bonds, mask)
        n_real = maskf.sum().clamp(min=1.0)
        target = x / coord_std
        coord_mse = ((pred["coords"] - target) ** 2 * maskf).sum() / (3 * n_real)
        with torch.no_grad():  # MSE of returning the (re-centred) noisy input, for reference
            xn = center(x_noisy / coord_std, mask)  # padding rows 0
            ident = ((xn - target) ** 2 * maskf).sum() / (3 * n_real)
        if bool(masked.any()):
            logits = pred["types"][masked][:, :K]
            truth = batch.atom_types[masked]
            type_ce = F.cross_entropy(logits, truth)
            type_acc = float((logits.argmax(-1) == truth).float().mean())
        else:
            type_ce, type_acc = coord_mse.new_zeros(()), float("nan")
        # Scaled by the noise variance: equivalent to predicting unit-variance noise (Frad-style); the identity
        # predictor scores about 1, so both terms start on the same scale.
        loss = coord_mse / sigma**2 + cfg.type_weight * type_ce
        if not torch.isfinite(loss):
            raise ReedError(
                f"fit_molecule_encoder: non-finite loss at step {step} (lower lr={cfg.lr} or check the data)"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
        opt.step()
        sched.step()

        a2 = coord_std**2
        acc["loss"] += loss.item()
        acc["denoise_mse"] += coord_mse.item() * a2
        acc["identity_mse"] += ident.item() * a2
        acc["type_ce"] += type_ce.item()
        acc["type_acc"] += type_acc if type_acc == type_acc else 0.0
        acc["n"] += 1
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            n = acc.pop("n")
            entry = {"step": step + 1, **{k: v / n for k, v in acc.items()}}
            entry["denoise_ratio"] = entry["denoise_mse"] / max(entry["identity_mse"], 1e-12)
            history.append(entry)
            acc = {k: 0.0 for k in acc} | {"n": 0}
            if progress and hasattr(steps, "set_postfix"):
                steps.set_postfix(denoise=f"{entry['denoise_mse']:.4f}", ce=f"{entry['type_ce']:.3f}")

    enc.eval().requires_grad_(False)
    probe: dict[str, float | None] = {"atoms_r2": None, "radius_of_gyration_r2": None, "molecules": 0}
    stats: dict[str, float] = {}
    if cfg.probe_max > 0:
        rng = np.random.default_rng(cfg.seed + 1)
        sel = np.sort(rng.permutation(len(mols))[: cfg.probe_max])
        sub = [mols[i] for i in sel]
        pooled, _ = _embed_fitted(enc, sub, max(cfg.batch_atoms, 1), device, per_atom=False)
        n_atoms = np.array([m.num_atoms for m in sub], dtype=np.float64)
        rg = np.array([math.sqrt(float(((m.coords - m.coords.mean(0)) ** 2).sum(1).mean())) for m in sub])
        probe = {
            "atoms_r2": _ridge_r2(pooled, n_atoms, cfg.seed),
            "radius_of_gyration_r2": _ridge_r2(pooled, rg, cfg.seed),
            "molecules": len(sub),
        }
        stats = {"mean_norm": float(np.linalg.norm(pooled, axis=1).mean()), "std": float(pooled.std()),
                 "first_molecule_sum": float(pooled[0].astype(np.float64).sum())}  # fmt: skip

    description = (f"reed fitted molecule encoder (egnn, hidden {cfg.hidden}, {cfg.layers} layers, denoise "
                   f"{cfg.noise} Å + mask {cfg.mask_prob}, {cfg.steps} steps; data {fp[:12]})")  # fmt: skip
    report = {
        "kind": ENCODER_KIND,
        "version": ENCODER_VERSION,
        "description": description,
        "config": asdict(cfg),
        "elements": list(elements),
        "coord_std": coord_std,
        "max_atoms": max_atoms,
        "data_fingerprint": fp,
        "data_name": dataset.name,
        "num_molecules": len(mols),
        "history": history,
        "first": history[0],
        "final": history[-1],
        "probe": probe,
        "embedding_stats": stats,
    }
    _save_encoder(enc, out_dir, report)
    return report


def _save_encoder(enc: FittedMoleculeEncoder, out_dir: Path, report: dict) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in enc.net.state_dict().items()}
    blob = save(state)
    report["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / WEIGHTS_NAME, blob)
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(report, indent=2, allow_nan=True))


# ----------------------------------------------------------------------------------------------------------------------
# UniMol (optional unimol_tools)
# ----------------------------------------------------------------------------------------------------------------------
_UNIMOL_WEIGHTS = {False: "mol_pre_all_h_220816.pt", True: "mol_pre_no_h_220816.pt"}
_UNIMOL_DICTS = ("mol.dict.txt", "dict.txt")
_UNIMOL_MAX_ATOMS = 510  # max_seq_len 512 minus BOS and EOS
_UNIMOL_HELP = (
    "UniMol weights are not downloaded by reed. On a machine with internet access run\n"
    "    huggingface-cli download dptech/Uni-Mol-Models {ckpt} mol.dict.txt --local-dir DIR\n"
    "(or fetch both files from https://huggingface.co/dptech/Uni-Mol-Models), copy DIR here and pass "
    "weights_dir=DIR (or set UNIMOL_WEIGHT_DIR=DIR)."
)


class UniMolEncoder:
    """Pretrained UniMol v1 (512-d) through ``unimol_tools.UniMolRepr``, from local weights only.

    Args:
        weights_dir: a directory holding ``mol_pre_all_h_220816.pt`` (``mol_pre_no_h_220816.pt`` with
            ``remove_hs=True``) and ``mol.dict.txt`` (or ``dict.txt``), or the path of a checkpoint file with the
            dictionary beside it. Default: ``$UNIMOL_WEIGHT_DIR``.
        device: ``"cpu"`` or ``"cuda"`` (unimol_tools always uses ``cuda:0`` when asked for a GPU).
        batch_size: molecules per UniMol forward pass.
        pooling: ``"mean"`` (default) mean of the atomic representations over the real atoms only (no BOS/EOS or
            padding, spec §7.2); ``"cls"`` the CLS (BOS) token vector; ``"sum_std"`` the reference's plain-UniMol
            target: sum over atoms, then per-sample standardisation across channels (§2.1).
        remove_hs: use the no-H model (hydrogens are then dropped and have no per-atom output; ``per_atom`` covers
            heavy atoms only). REED uses all-H (default).
        repr_factory: the ``UniMolRepr`` class or a stand-in with its signature (for tests); default imports it.

    Calling the encoder with a list of :class:`Molecule` returns ``(pooled (B, 512) float32, per_atom)`` with
    ``per_atom[i]`` of shape ``(n_i, 512)``. Requires ``pip install unimol_tools`` (0.1.6 pins ``numpy<2.3``, so
    it may need its own environment; compute the targets there with :func:`embed_molecules`, then train anywhere).
    """

    dim = 512

    def __init__(self, weights_dir: str | os.PathLike | None = None, device="cpu", batch_size: int = 32, *,
                 pooling: str = "mean", remove_hs: bool = False, repr_factory: Callable[..., Any] | None = None):
        if pooling not in ("mean", "cls", "sum_std"):
            raise ConfigError(f"UniMolEncoder: pooling must be 'mean', 'cls' or 'sum_std', got {pooling!r}")
        if int(batch_size) < 1:
            raise ConfigError(f"UniMolEncoder: batch_size must be >= 1, got {batch_size}")
        self.pooling, self.remove_hs, self.batch_size = pooling, bool(remove_hs), int(batch_size)
        problems: list[str] = []
        if repr_factory is None:
            try:
                from unimol_tools import UniMolRepr as repr_factory  # type: ignore[no-redef]
            except Exception as exc:  # ImportError, or a broken install (e.g. a numpy ABI mismatch)
                problems.append(
                    f"the optional package unimol_tools is not installed or cannot be imported ({exc}); install it "
                    "with "
                    "`pip install unimol_tools` (it pins numpy<2.3 and pulls pandas, numba, hydra-core; use a "
                    "separate environment if that conflicts)"
                )
        ckpt_name = _UNIMOL_WEIGHTS[self.remove_hs]
        ckpt, dict_path = self._locate(weights_dir, ckpt_name, problems)
        if problems:
            raise ReedError("UniMolEncoder cannot be built:\n- " + "\n- ".join(problems))
        self.checkpoint, self.dict_path = ckpt, dict_path
        self.vocabulary = self._read_dict(dict_path)
        use_cuda = torch.device(device).type == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError(f"UniMolEncoder: device {device!r} requested but CUDA is not available")
        self.description = (f"unimol_tools UniMolRepr unimolv1 ({'no-H' if self.remove_hs else 'all-H'}, "
                            f"{ckpt.name}), pooled={pooling} over real atoms" if pooling != "cls" else
                            f"unimol_tools UniMolRepr unimolv1 ({ckpt.name}), pooled=CLS token")  # fmt: skip
        try:
            with _torch_load_allow_namespace():
                self.model = repr_factory(
                    data_type="molecule", batch_size=self.batch_size, remove_hs=self.remove_hs, model_name="unimolv1",
                    use_cuda=use_cuda, use_ddp=False, pretrained_model_path=str(ckpt),
                    pretrained_dict_path=str(dict_path), max_atoms=_UNIMOL_MAX_ATOMS,
                )  # fmt: skip
        except Exception as exc:
            msg = str(exc)
            if "weights_only" in msg or "Unpickl" in type(exc).__name__:
                raise ReedError(
                    f"{ckpt}: torch.load(weights_only=True) refused the checkpoint ({msg.splitlines()[0]}). If you "
                    "trust the file, re-save only its weights: python -c \"import torch; c = torch.load('IN', "
                    "weights_only=False); torch.save({'model': c['model']}, 'OUT')\" and point weights_dir at OUT."
                ) from exc
            raise ReedError(f"UniMolEncoder: unimol_tools failed to build the model from {ckpt} ({exc})") from exc

    @staticmethod
    def _locate(weights_dir, ckpt_name: str, problems: list[str]) -> tuple[Path, Path]:
        if weights_dir is None:
            env = os.environ.get("UNIMOL_WEIGHT_DIR")
            if not env:
                problems.append("no UniMol weights given (weights_dir=None and UNIMOL_WEIGHT_DIR unset). "
                                + _UNIMOL_HELP.format(ckpt=ckpt_name))
                return Path(ckpt_name), Path(_UNIMOL_DICTS[0])
            weights_dir = env
        p = Path(weights_dir)
        if p.is_file():
            ckpt, folder = p, p.parent
        else:
            ckpt, folder = p / ckpt_name, p
        dicts = [folder / d for d in _UNIMOL_DICTS]
        dict_path = next((d for d in dicts if d.is_file()), dicts[0])
        missing = [str(x) for x in (ckpt, dict_path) if not x.is_file()]
        if missing:
            problems.append(f"missing UniMol file(s) {missing}. " + _UNIMOL_HELP.format(ckpt=ckpt_name))
        return ckpt, dict_path

    @staticmethod
    def _read_dict(path: Path) -> set[str]:
        try:
            return {ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()}
        except Exception as exc:
            raise ReedError(f"{path}: cannot read the UniMol dictionary ({exc})") from exc

    def __call__(self, molecules: Sequence[Molecule]) -> tuple[np.ndarray, list[np.ndarray]]:
        mols = list(molecules)
        if not mols:
            return np.zeros((0, self.dim), np.float32), []
        symbols, coords, expected = [], [], []
        for i, m in enumerate(mols):
            if m.num_atoms == 0:
                raise DataError(f"UniMolEncoder: molecule {i} has no atoms")
            if m.num_atoms > _UNIMOL_MAX_ATOMS:
                raise DataError(f"UniMolEncoder: molecule {i} has {m.num_atoms} atoms; UniMol takes at most "
                                f"{_UNIMOL_MAX_ATOMS} (max_seq_len 512 with BOS/EOS)")
            s = m.symbols
            keep = [k for k, a in enumerate(s) if not (self.remove_hs and a == "H")]
            symbols.append(s)
            coords.append(m.coords.astype(np.float32))
            expected.append([s[k] for k in keep])
        unknown = sorted({a for s in symbols for a in s} - self.vocabulary)
        if unknown:
            warnings.warn(f"UniMolEncoder: element(s) {unknown} are not in the UniMol dictionary {self.dict_path} "
                          "and are encoded as [UNK]", stacklevel=2)  # fmt: skip
        out = self.model.get_repr({"atoms": symbols, "coordinates": coords}, return_atomic_reprs=True)
        if not isinstance(out, dict) or "atomic_reprs" not in out or "cls_repr" not in out:
            raise ReedError("UniMolEncoder: unimol_tools get_repr(return_atomic_reprs=True) did not return a dict "
                            "with 'cls_repr' and 'atomic_reprs' (incompatible unimol_tools version?)")
        cls_repr, atomic = list(out["cls_repr"]), list(out["atomic_reprs"])
        atomic_symbols = out.get("atomic_symbol")
        if len(cls_repr) != len(mols) or len(atomic) != len(mols):
            raise ReedError(f"UniMolEncoder: unimol_tools returned {len(atomic)} representations for {len(mols)} "
                            "molecules")
        pooled = np.zeros((len(mols), self.dim), dtype=np.float32)
        per_atom: list[np.ndarray] = []
        for i in range(len(mols)):
            a = np.asarray(atomic[i], dtype=np.float32)
            n = len(expected[i])
            if a.shape != (n, self.dim):
                raise DataError(f"UniMolEncoder: molecule {i}: expected atomic representations of shape "
                                f"({n}, {self.dim}), got {a.shape} (atoms dropped or cropped by unimol_tools?)")
            if atomic_symbols is not None and list(atomic_symbols[i]) != [
                a_ if a_ in self.vocabulary else "[UNK]" for a_ in expected[i]
            ]:
                raise DataError(f"UniMolEncoder: molecule {i}: unimol_tools reordered or changed the atoms "
                                f"({list(atomic_symbols[i])[:8]}… vs {expected[i][:8]}…)")
            per_atom.append(a)
            if self.pooling == "cls":
                pooled[i] = np.asarray(cls_repr[i], dtype=np.float32).reshape(-1)
            elif self.pooling == "mean":
                pooled[i] = a.astype(np.float64).mean(0)
            else:
                s = a.astype(np.float64).sum(0)
                pooled[i] = (s - s.mean()) / s.std()
        return pooled, per_atom


@contextlib.contextmanager
def _torch_load_allow_namespace():
    """UniMol checkpoints store an ``argparse.Namespace`` of training args; allow exactly that class under
    ``torch.load(weights_only=True)`` (the default since torch 2.6) while unimol_tools loads them."""
    ctx = getattr(torch.serialization, "safe_globals", None)
    if ctx is None:
        yield
        return
    with ctx([argparse.Namespace]):
        yield


# ----------------------------------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------------------------------
def compute_molecule_targets(dataset: MoleculeDataset, encoder, *, batch_atoms: int = 4096, per_atom: bool = False,
                             progress: bool = True, device="cpu") -> tuple[np.ndarray, list | None, str, str]:
    """``(pooled (N, D) float32, per-atom list of (n_i, D) or None, encoder description, data-set fingerprint)`` for
    every molecule of ``dataset`` in order.

    ``encoder`` is a :class:`FittedMoleculeEncoder`, the directory of one (loaded onto ``device``), or any callable
    ``molecules -> (pooled (B, D), per_atom list of (n_i, D))`` such as :class:`UniMolEncoder`. Molecules are
    processed in batches of at most ``batch_atoms`` padded atoms, sorted by size; the results are put back in data-set
    order. Non-finite values raise DataError naming the first bad molecule.
    """
    if int(batch_atoms) < 1:
        raise ConfigError(f"embed_molecules: batch_atoms must be >= 1, got {batch_atoms}")
    mols = _molecules(dataset)
    if not mols:
        raise DataError("embed_molecules: the data set is empty")
    if isinstance(encoder, (str, os.PathLike)):
        encoder = FittedMoleculeEncoder.load(encoder, device=device)
    description = str(getattr(encoder, "description", type(encoder).__name__))
    if isinstance(encoder, FittedMoleculeEncoder):
        encoder = encoder.to(device).eval()
        pooled, atoms = _embed_fitted(encoder, mols, int(batch_atoms), device, per_atom, progress)
    elif callable(encoder):
        sizes = np.array([m.num_atoms for m in mols], dtype=np.int64)
        order = np.argsort(sizes, kind="stable")
        pooled_rows: list[np.ndarray | None] = [None] * len(mols)
        atom_rows: list[np.ndarray | None] = [None] * len(mols)
        chunks = list(_batches_by_atoms(sizes, order, int(batch_atoms)))
        for chunk in progress_bar(chunks, progress, "embed molecules"):
            p, a = encoder([mols[i] for i in chunk])
            p = np.asarray(p.detach().cpu() if isinstance(p, Tensor) else p, dtype=np.float32)
            if p.ndim != 2 or p.shape[0] != len(chunk):
                raise DataError(f"embed_molecules: encoder returned pooled shape {p.shape} for {len(chunk)} molecules")
            for k, i in enumerate(chunk):
                pooled_rows[i] = p[k]
                if per_atom:
                    ak = np.asarray(a[k].detach().cpu() if isinstance(a[k], Tensor) else a[k], dtype=np.float32)
                    if ak.ndim != 2 or ak.shape[0] != mols[i].num_atoms:
                        raise DataError(f"embed_molecules: encoder returned per-atom shape {ak.shape} for molecule "
                                        f"{i} with {mols[i].num_atoms} atoms")
                    atom_rows[i] = ak
        pooled = np.stack(pooled_rows)  # type: ignore[arg-type]
        atoms = atom_rows if per_atom else None  # type: ignore[assignment]
    else:
        raise ConfigError(f"embed_molecules: encoder must be a FittedMoleculeEncoder, its directory or a callable, "
                          f"got {type(encoder).__name__}")

    pooled = pooled.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(pooled).all(axis=1))
    if bad.size:
        raise DataError(f"embed_molecules: the encoder produced non-finite values for molecule {int(bad[0])}")
    return pooled, (atoms if per_atom else None), description, dataset_fingerprint(mols)


def embed_molecules(
    dataset: MoleculeDataset,
    encoder,
    out_path,
    *,
    batch_atoms: int = 4096,
    per_atom: bool = False,
    progress: bool = True,
    device="cpu",
) -> Path:
    """Compute targets for every molecule of ``dataset`` (in order, see :func:`compute_molecule_targets`) and write
    them to ``out_path`` (.npz, atomic), per-atom targets included when ``per_atom``. See the module docstring for
    the file layout."""
    out_path = Path(out_path)
    pooled, atoms, description, fingerprint = compute_molecule_targets(
        dataset, encoder, batch_atoms=batch_atoms, per_atom=per_atom, progress=progress, device=device)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(TARGETS_FORMAT),
        "version": np.array(TARGETS_VERSION, dtype=np.int64),
        "pooled": pooled,
        "fingerprint": np.array(fingerprint),
        "encoder": np.array(description),
    }
    if per_atom:
        flat = np.concatenate(atoms, axis=0) if atoms else np.zeros((0, pooled.shape[1]), np.float32)
        if flat.size and float(np.abs(flat).max()) > _FP16_MAX:
            warnings.warn("embed_molecules: per-atom values exceed the float16 range; storing them as float32",
                          stacklevel=2)
            arrays["atoms"] = flat.astype(np.float32)
        else:
            arrays["atoms"] = flat.astype(np.float16)
        arrays["offsets"] = np.concatenate([[0], np.cumsum([len(a) for a in atoms])]).astype(np.int64)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savez(out_path, arrays)
    return out_path


def store_molecule_targets(dataset: MoleculeDataset, encoder, directory, *, batch_atoms: int = 4096,
                           progress: bool = True, device="cpu") -> TargetStore:
    """The pooled targets of every molecule of ``dataset`` in the generic target store (:mod:`reed.store`) at
    ``directory``, written once (float32, one shard, the data-set fingerprint in the manifest) and opened with
    the count and fingerprint checked. What training reads; per-atom targets need :func:`embed_molecules`."""
    directory = Path(directory)
    if not (directory / "manifest.json").is_file():
        pooled, _, description, fingerprint = compute_molecule_targets(
            dataset, encoder, batch_atoms=batch_atoms, progress=progress, device=device)
        w = TargetStoreWriter(directory, source=f"molecule_encoder:{description}", count=len(pooled),
                              shape=(pooled.shape[1],), dtype="float32", shard_size=max(len(pooled), 1),
                              dataset_fingerprint=fingerprint, preprocessing={"pooling": "mean over real atoms"})
        w.write(lambda idx: pooled[idx], batch_size=len(pooled), progress=False)
        w.finalize()
    return TargetStore(directory, expect_count=len(dataset), expect_dataset=dataset_fingerprint(dataset))


def load_molecule_targets(path, dataset: MoleculeDataset) -> dict:
    """Read targets written by :func:`embed_molecules` and check that they belong to ``dataset``.

    Returns ``{"pooled": Tensor (N, D) float32, "encoder": str, "fingerprint": str}`` plus, when per-atom targets
    were stored, ``"atoms"`` (sum n_i, D) float32 and ``"offsets"`` (N + 1,) int64 (molecule i's atoms are
    ``atoms[offsets[i]:offsets[i + 1]]``).

    Raises DataError naming the file when it is missing or unreadable, a key is missing, the number of rows or the
    per-molecule atom counts differ from ``dataset``, the fingerprint differs ("computed for different data"), or a
    value is NaN/inf (naming the first bad molecule index).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: molecule target file not found (compute it with embed_molecules)")
    d = read_npz(path, "molecule target file", required=("pooled", "fingerprint"))
    if "atoms" in d and "offsets" not in d:
        raise DataError(f"{path}: not a molecule target file, missing key(s) ['offsets']")
    pooled = d["pooled"]
    mols = _molecules(dataset)
    if pooled.ndim != 2:
        raise DataError(f"{path}: 'pooled' must be 2-D (N, D), got shape {pooled.shape}")
    if pooled.shape[0] != len(mols):
        raise DataError(f"{path}: targets hold {pooled.shape[0]} molecules but the data set has {len(mols)}; they "
                        "were computed for different data (re-run embed_molecules on this data set)")
    fp_file, fp_data = str(d["fingerprint"]), dataset_fingerprint(mols)
    if fp_file != fp_data:
        raise DataError(f"{path}: the targets were computed for different data (fingerprint {fp_file[:12]}… vs "
                        f"{fp_data[:12]}… for this data set, same count {len(mols)}); re-run embed_molecules")
    bad = np.flatnonzero(~np.isfinite(pooled).all(axis=1))
    if bad.size:
        raise DataError(f"{path}: non-finite pooled target for molecule index {int(bad[0])} "
                        f"({bad.size} molecule(s) affected)")
    check_target_values(pooled, f"{path}: pooled target")
    out: dict[str, Any] = {
        "pooled": torch.from_numpy(pooled.astype(np.float32)),
        "encoder": str(d.get("encoder", "")),
        "fingerprint": fp_file,
    }
    if "atoms" in d:
        atoms, offsets = d["atoms"], d["offsets"].astype(np.int64)
        counts = np.array([m.num_atoms for m in mols], dtype=np.int64)
        if offsets.shape != (len(mols) + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) != counts):
            raise DataError(f"{path}: 'offsets' do not match the data set's atom counts")
        if atoms.ndim != 2 or atoms.shape[0] != offsets[-1] or atoms.shape[1] != pooled.shape[1]:
            want = (int(offsets[-1]), int(pooled.shape[1]))
            raise DataError(f"{path}: 'atoms' has shape {atoms.shape}, expected {want}")
        bad_atoms = np.flatnonzero(~np.isfinite(atoms).all(axis=1))
        if bad_atoms.size:
            mol = int(np.searchsorted(offsets, bad_atoms[0], side="right") - 1)
            raise DataError(
                f"{path}: non-finite per-atom target for molecule index {mol} (atom row {int(bad_atoms[0])})"
            )
        check_target_values(atoms, f"{path}: per-atom target")
        out["atoms"] = torch.from_numpy(atoms.astype(np.float32))
        out["offsets"] = torch.from_numpy(offsets)
    return out
