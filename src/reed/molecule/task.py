"""The 3D-molecule domain for the trainer: equivariant flow matching over coordinates, atom types, bonds and
charges (SemlaFlow-style), aligned to a molecular encoder's per-molecule representation.

Batches are atom-budget batches (``molecule.data.atom_budget`` atoms, sorted by size and packed, none dropped,
rebuilt every epoch with equal-size molecules reshuffled between them, :class:`MoleculeEpochs`), so ``train.epochs``
sets the number of steps and the curriculum can be given in epochs, as in the reference (generative loss ramped in
over the first 30 epochs, alignment weight 0.2; spec molecule.md section 2.4). As in the reference the ramp moves
every optimizer step (``molecule.curriculum_every: step``): 30 epochs of S steps ramp over 30 S steps.
Coordinates are scaled by ``1/coord_std`` for the model and back to Å for metrics and files.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from reed.config import Config, build_from
from reed.domains import build_objective, resolve_targets
from reed.epochs import EpochBatches
from reed.errors import ConfigError, DataError
from reed.io import eval_mode, fingerprint, progress_bar
from reed.loader import to_device
from reed.molecule.batch import collate, uncollate
from reed.molecule.chem import type_vocabulary
from reed.molecule.dataset import MoleculeDataset
from reed.molecule.flow import MoleculeFlow, self_condition_inputs
from reed.molecule.nets.denoiser import MoleculeDenoiser, build_molecule_model
from reed.objective import DenoiserOutput, Objective, ReedModule
from reed.store import TargetStore


def load_molecules(cfg: Config, progress: bool = False) -> MoleculeDataset:
    """The whole data set of ``cfg.molecule.data`` (before splitting)."""
    d = cfg.molecule.data
    if not d.path:
        raise ConfigError("config key 'molecule.data.path' is required (an EDM .npz, an SDF file or a SMILES file)")
    if d.format == "edm_npz":
        return MoleculeDataset.from_edm_npz(d.path, limit=d.limit, progress=progress, kekulize=d.kekulize,
                                            conformers=d.conformers)
    if d.format == "sdf":
        ds = MoleculeDataset.from_sdf(d.path, progress=progress)
    else:
        ds = MoleculeDataset.from_smiles(d.path, seed=cfg.seed, progress=progress)
    return ds.subset(range(min(len(ds), d.limit))) if d.limit else ds


def load_molecule_splits(cfg: Config, progress: bool = False) -> dict[str, MoleculeDataset]:
    """{"train", "valid", "test"} (test empty with two split fractions)."""
    full = load_molecules(cfg, progress)
    parts = full.split(tuple(cfg.molecule.data.split), seed=cfg.seed)
    names = ("train", "valid", "test")
    out = {n: p for n, p in zip(names, parts)}
    out.setdefault("test", full.subset([]))
    return out


def build_molecule_denoiser(cfg: Config, num_atom_types: int) -> MoleculeDenoiser:
    m = cfg.molecule.model
    over = {k: getattr(m, k) for k in ("hidden", "layers") if getattr(m, k) is not None}
    return build_molecule_model(m.preset, num_atom_types, **over)


def build_denoiser_from_config(cfg: Config) -> MoleculeDenoiser:
    """The denoiser of a resolved config (``molecule.elements`` filled in, e.g. a checkpoint's)."""
    if not cfg.molecule.elements:
        raise ConfigError("molecule config has no resolved element vocabulary (molecule.elements)")
    return build_molecule_denoiser(cfg, len(cfg.molecule.elements))


def build_flow(cfg: Config, num_atom_types: int) -> MoleculeFlow:
    p = cfg.molecule.process
    weights = {"coords": p.w_coords, "types": p.w_types, "bonds": p.w_bonds, "charges": p.w_charges}
    return build_from(MoleculeFlow, p, num_atom_types=num_atom_types, loss_weights=weights)


def model_fn(model):
    """The sampler's view of a denoiser: (x_t, types_t, bonds_t, t, mask, self_cond) -> prediction dict."""

    def fn(x, types, bonds, t, mask, sc):
        return model(x, types, bonds, t, mask, sc)[0]

    return fn


@torch.no_grad()
def generate_molecules(model: MoleculeDenoiser, cfg: Config, elements, count_dist: np.ndarray, num: int, *,
                       seed: int = 0, device="cpu", steps: int | None = None, progress: bool = False):
    """``num`` molecules (list of :class:`~reed.molecule.chem.Molecule`, coordinates in Å) with atom counts drawn
    from ``count_dist`` (entry n = probability of n atoms, e.g. the training set's)."""
    from reed.molecule.sampling import sample_molecules

    sc = cfg.molecule.sample
    flow = build_flow(cfg, len(elements))
    rng = np.random.default_rng(seed)
    sizes = rng.choice(len(count_dist), size=num, p=count_dist / count_dist.sum())
    out = []
    with eval_mode(model):
        for i in progress_bar(range(0, num, sc.batch_size), progress, "sample"):
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
            res = sample_molecules(model_fn(model), torch.as_tensor(sizes[i : i + sc.batch_size]), len(elements),
                                   flow=flow, steps=steps or sc.steps, grid=sc.grid, eta=sc.eta, generator=g,
                                   self_condition=getattr(model, "self_condition", True), device=device)
            x = res["coords"] * cfg.molecule.data.coord_std
            out += uncollate(x.cpu(), res["types"].cpu(), res["bonds"].cpu(), res["charges"].cpu(),
                             res["mask"].cpu(), elements)
    return out


class MoleculeEpochs(EpochBatches):
    """:class:`~reed.epochs.EpochBatches` whose batches are rebuilt every epoch.

    Epoch e uses ``dataset.batches(atom_budget, shuffle_seed=...)`` with a seed that is a pure function of
    (seed, e): molecules of equal size are shuffled between batches and the batch order is shuffled, so batch
    contents change from epoch to epoch (the reference reshuffles its size buckets every epoch) while the number of
    batches, which depends on the sorted sizes only, stays the same. Resume is exact.
    """

    def __init__(self, dataset: MoleculeDataset, atom_budget: int, *, seed: int, world: int, grad_accum: int):
        self.dataset, self.atom_budget = dataset, int(atom_budget)
        super().__init__(self.epoch_batches(0, seed), seed=seed, world=world, grad_accum=grad_accum)
        self._epoch = 0

    def epoch_batches(self, epoch: int, seed: int | None = None) -> list[list[int]]:
        """The batches (lists of example indices) of ``epoch``, in the order they are consumed."""
        seed = self.seed if seed is None else seed
        return self.dataset.batches(self.atom_budget, shuffle_seed=(seed * 1_000_003 + epoch) % 2**63)

    def indices(self, step: int, rank: int):
        """The ``grad_accum`` batches (example indices) of process ``rank`` at ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # rebuilt once per epoch (and on resume), cached in between
            self.batches, self._epoch = self.epoch_batches(epoch), epoch
        for k in range(self.grad_accum):
            pos = (within * self.per_step + k * self.world + rank) % len(self.batches)
            yield self.batches[pos]


class MoleculeTargets:
    """Per-molecule targets of the training set, one target store (:mod:`reed.store`, rows (N,D)) per term name,
    computed once into the cache and reused while data, encoder and its weights are unchanged."""

    def __init__(self, terms_cfg, train: MoleculeDataset, cache_dir: str, device, progress: bool):
        from reed.molecule.targets import dataset_fingerprint, store_molecule_targets

        self.stores: dict[str, TargetStore] = {}
        fp = dataset_fingerprint(train)
        for t in terms_cfg:
            key = hashlib.sha1(f"{fp}|{t.encoder}|{t.path}|{_weights_stamp(t.path)}".encode()).hexdigest()[:16]
            path = Path(cache_dir) / "molecule_targets" / f"{t.name}_{key}"
            encoder = None if (path / "manifest.json").is_file() else self._encoder(t, device)
            self.stores[t.name] = store_molecule_targets(train, encoder, path, progress=progress, device=device)

    def batch(self, idx, device) -> dict[str, torch.Tensor]:
        """{name: (B, D)} of the training molecules ``idx``."""
        return {name: s.get(idx).to(device) for name, s in self.stores.items()}

    @staticmethod
    def _encoder(t, device):
        if t.encoder == "fitted":
            from reed.molecule.targets import FittedMoleculeEncoder

            if not t.path or not Path(t.path).is_dir():
                raise ConfigError(f"target '{t.name}': no fitted encoder at {t.path}; run `reed fit-encoder CONFIG`")
            return FittedMoleculeEncoder.load(t.path, device=device)
        if t.encoder == "unimol":
            from reed.molecule.targets import UniMolEncoder

            return UniMolEncoder(t.path, device=device)
        raise ConfigError(f"target '{t.name}': encoder must be 'fitted' or 'unimol' for molecules, got {t.encoder!r}")


def _weights_stamp(path: str | None) -> str:
    """Size+mtime of the files in an encoder directory: the cache key changes when the encoder is refitted."""
    if not path or not Path(path).is_dir():
        return ""
    return ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in sorted(Path(path).iterdir())
                    if f.is_file())


class MoleculeTask:
    """3D molecule generation (equivariant flow + REED). A :class:`reed.domains.Domain`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def setup(self, *, device: torch.device, main_process_first, progress: bool, world: int = 1) -> Config:
        cfg = self.cfg
        self.splits = load_molecule_splits(cfg, progress=progress)
        self.train_set = self.splits["train"]
        if len(self.train_set) == 0:
            raise DataError(f"no training molecules in {cfg.molecule.data.path}")
        # the model's atom-type classes: the data's elements, or the reference's 18 tokens
        self.elements = type_vocabulary(self.train_set.elements, cfg.molecule.type_vocab)
        if cfg.molecule.elements and tuple(cfg.molecule.elements) != tuple(self.elements):
            raise ConfigError(f"config key 'molecule.elements' is {cfg.molecule.elements} but the data and "
                              f"molecule.type_vocab={cfg.molecule.type_vocab!r} give {list(self.elements)}")
        cfg = cfg.with_section(elements=list(self.elements))

        def load(terms_cfg):
            with main_process_first():
                targets = MoleculeTargets(terms_cfg, self.train_set, cfg.train.cache_dir, device, progress)
            return targets, {name: s.dim for name, s in targets.stores.items()}

        cfg, self.targets = resolve_targets(cfg, load)
        budget = cfg.molecule.data.atom_budget
        if cfg.molecule.data.reshuffle:
            self.epochs = MoleculeEpochs(self.train_set, budget, seed=cfg.seed, world=world,
                                         grad_accum=cfg.train.grad_accum)
        else:
            self.epochs = EpochBatches(self.train_set.batches(budget), seed=cfg.seed, world=world,
                                       grad_accum=cfg.train.grad_accum)
        self.steps_per_epoch = self.epochs.steps_per_epoch
        cfg = self.epochs.resolve_steps(cfg)
        self.flow = build_flow(cfg, len(self.elements))
        self.count_dist = self.train_set.atom_count_distribution()
        self._train_smiles: set[str] | None = None
        self.cfg = cfg
        return cfg

    def fingerprint(self) -> str:
        """The training set's fingerprint (stored in checkpoints; resuming on other data is refused)."""
        return fingerprint([(m.atoms, m.coords, m.bonds, m.charges) for m in self.train_set])

    def build_denoiser(self) -> MoleculeDenoiser:
        den = build_molecule_denoiser(self.cfg, len(self.elements))
        for i, t in enumerate(self.cfg.targets):
            if not isinstance(t.depth, int) or not 1 <= t.depth <= den.depth:
                raise ConfigError(f"config key 'targets.{i}.depth' is {t.depth!r}; the molecule model has layers "
                                  f"1..{den.depth}")
            if t.kind != "pooled":
                raise ConfigError(f"config key 'targets.{i}.kind' must be 'pooled' for per-molecule targets")
        return den

    def build_objective(self) -> Objective:
        """The REED objective; with ``curriculum.unit: epoch`` and ``molecule.curriculum_every: step`` the epoch
        counts become step counts, so the generative warm-up rises every step (the reference's
        ``min(step / (E * steps_per_epoch), 1)``) instead of once per epoch."""
        obj = build_objective(self.cfg, self.flow, self.steps_per_epoch)
        c = obj.curriculum
        if self.cfg.objective.curriculum.unit == "epoch" and self.cfg.molecule.curriculum_every == "step":
            k = c.steps_per_unit
            obj.curriculum = replace(c, gen_start=c.gen_start * k, gen_warmup=c.gen_warmup * k,
                                     align_steps=c.align_steps * k, total=max(self.cfg.train.steps, 1),
                                     steps_per_unit=1)
        return obj

    def host_batches(self, step: int, rank: int, world: int) -> list:
        """This process's ``grad_accum`` atom-budget batches of ``step``, collated on the host (a data-loader
        worker): [(MoleculeBatch, {target: (B,D)}), ...]; rotations drawn from (seed, step, rank)."""
        rot = torch.Generator().manual_seed(self.cfg.seed * 7_919 + step * 64 + rank)
        out = []
        for idx in self.epochs.indices(step, rank):
            mols = [self.train_set[int(i)] for i in idx]
            out.append((collate(mols, self.elements, rotate=self.cfg.molecule.data.rotate, generator=rot),
                        self.targets.batch(idx, "cpu")))
        return out

    def device_batch(self, host, device: torch.device, generator: torch.Generator):
        return to_device(host, device)

    def loss(self, objective: Objective, module: ReedModule, batch, step: int, generator: torch.Generator):
        mb, z = batch
        x0 = mb.x / self.cfg.molecule.data.coord_std
        c = self.flow.corrupt(x0, mb.atom_types, mb.bonds, mb.mask, generator=generator)
        sc = None
        p_sc = self.cfg.molecule.process.self_condition
        if p_sc > 0:
            use = float(torch.rand((), generator=generator, device=generator.device)) < p_sc
            if use:  # self-conditioning pass without gradient, as the reference (once per batch)
                with torch.no_grad():
                    first, _ = module(c.x_t, c.types_t, c.bonds_t, c.t, mb.mask, None)
                sc = self_condition_inputs(first, mb.mask)
        pred, hidden = module(c.x_t, c.types_t, c.bonds_t, c.t, mb.mask, sc, taps=objective.taps)
        losses = self.flow.loss(pred, x0, mb.atom_types, mb.bonds, mb.charges, mb.mask)
        out = DenoiserOutput(losses["total"].mean(), c.t, hidden, token_mask=mb.mask)
        loss, parts = objective.combine(module, out, z, step)
        for k in ("coords", "types", "bonds", "charges"):
            parts[f"gen/{k}"] = losses[k].detach().mean()
        return loss, parts

    def eval_due(self, done: int) -> bool:
        every = self.cfg.molecule.eval_every
        return every > 0 and done % every == 0

    def train_smiles(self) -> set[str]:
        if self._train_smiles is None:
            self._train_smiles = self.train_set.smiles_set()
        return self._train_smiles

    def evaluate(self, model: MoleculeDenoiser, run_dir: Path, step: int, device: torch.device) -> dict:
        """Sample ``eval_num`` molecules from the EMA model; stability, validity, uniqueness, novelty; a grid."""
        from reed.molecule.metrics import depiction_grid, molecule_metrics

        mols = generate_molecules(model, self.cfg, self.elements, self.count_dist, self.cfg.molecule.eval_num,
                                  seed=self.cfg.seed, device=device)
        res = molecule_metrics(mols, self.train_smiles(), aromatic=self.cfg.molecule.aromatic_rule)
        depiction_grid(mols[:24], run_dir / "samples" / f"step_{step:07d}.png")
        keys = ("atom_stability", "molecule_stability", "validity", "connected_validity", "uniqueness", "novelty")
        return {"epoch": step / self.steps_per_epoch, **{k: float(res[k]) for k in keys if k in res}}

    def title(self) -> str:
        return f"{self.cfg.objective.method}: {self.cfg.molecule.model.preset} (molecules)"
