"""The protein inverse-folding domain for the trainer: masked discrete diffusion on a ProteinMPNN-style network,
aligned to per-residue / pairwise / structure representations from a protein target store.

Batches are token-budget batches (``protein.data.token_budget`` residues, sorted by length and packed, none
dropped), so an *epoch* is the natural unit: ``train.epochs`` sets the number of steps and the curriculum can be
given in epochs (``objective.curriculum.unit: epoch``), as in the reference (spec protein.md section 4).
"""

from __future__ import annotations

from pathlib import Path

import torch

from reed.config import Config, build_from
from reed.domains import build_objective, resolve_targets
from reed.epochs import EpochBatches
from reed.errors import ConfigError, DataError
from reed.io import fingerprint
from reed.loader import to_device
from reed.objective import DenoiserOutput, Objective, ReedModule
from reed.processes.masked import MaskedDiffusion
from reed.protein.data import ProteinDataset, ProteinExample, collate, read_cluster_list
from reed.protein.mpnn import MPNN_PRESETS, MPNNDenoiser, build_mpnn
from reed.protein.targets.store import ProteinTargetStore


def build_mpnn_denoiser(cfg: Config) -> MPNNDenoiser:
    """The MPNN denoiser described by ``cfg.protein.model``."""
    m = cfg.protein.model
    kw = dict(MPNN_PRESETS[m.preset])
    for key in ("hidden", "encoder_layers", "decoder_layers", "k_neighbors"):
        if getattr(m, key) is not None:
            kw[key] = getattr(m, key)
    return build_mpnn(**kw, dropout=m.dropout, backbone_noise=m.backbone_noise, learnable_node=m.learnable_node,
                      update_edge=m.update_edge)


def build_process(cfg: Config) -> MaskedDiffusion:
    return build_from(MaskedDiffusion, cfg.protein.process)


def load_splits(cfg: Config, progress: bool = False) -> dict[str, ProteinDataset]:
    """{"train", "valid", "test"} data sets of ``cfg.protein.data``."""
    d = cfg.protein.data
    if not d.path:
        raise ConfigError("config key 'protein.data.path' is required (a directory of PDB/mmCIF files or the "
                          "pdb_2021aug02 root)")
    if d.format == "pdb_2021aug02":
        index, cluster_file = d.index_file(), d.cluster_file()
        if not index.is_file():
            hint = ("config key 'protein.data.chain_list'; REED's list_filtered.csv comes with its data"
                    if d.chain_list else "is config key 'protein.data.path' the pdb_2021aug02 root?")
            raise DataError(f"{index}: index file not found ({hint})")
        if cluster_file is not None and not cluster_file.is_file():
            raise DataError(f"{cluster_file}: cluster list not found (config key 'protein.data.cluster_list'; "
                            "REED's cluster_seq_dict_removeX.pkl comes with its data)")
        clusters = None if cluster_file is None else read_cluster_list(cluster_file)
        return {s: ProteinDataset.from_pdb_2021aug02(d.path, s, max_length=d.max_length,
                                                     max_resolution=d.max_resolution, member=d.member,
                                                     seed=cfg.seed, progress=progress,
                                                     index=d.chain_list or "list.csv", clusters=clusters)
                for s in ("train", "valid", "test")}
    if len(d.split) != 3 or abs(sum(d.split) - 1.0) > 1e-6:
        raise ConfigError(f"config key 'protein.data.split' must be three fractions summing to 1, got {d.split}")
    full = ProteinDataset.from_directory(d.path, mode=d.mode, max_length=d.max_length, progress=progress)
    train, valid, test = full.split(tuple(d.split), seed=cfg.seed, by=d.split_by)
    return {"train": train, "valid": valid, "test": test}


class ProteinTargets:
    """The alignment targets of a protein run: one (store, array) per term name, batched by example name."""

    def __init__(self, terms_cfg, examples: list[ProteinExample] | None = None):
        self.items: dict[str, tuple[ProteinTargetStore, str]] = {}
        stores: dict[str, ProteinTargetStore] = {}
        for t in terms_cfg:
            if t.path not in stores:
                stores[t.path] = ProteinTargetStore(t.path)
            store, array = stores[t.path], t.array or t.name
            if array not in store.dims:
                raise ConfigError(f"target '{t.name}': the store {t.path} has no array '{array}' "
                                  f"(has: {sorted(store.dims)})")
            self.items[t.name] = (store, array)
            if examples is not None:
                missing = [e.name for e in examples if e.name not in store]
                if missing:
                    raise DataError(f"target '{t.name}': {len(missing)} training examples are not in the store "
                                    f"{t.path}, e.g. {missing[:10]}; run `reed embed-protein` for them")

    def dim(self, name: str) -> int:
        store, array = self.items[name]
        return int(store.dims[array])

    def batch(self, examples: list[ProteinExample], max_len: int, device) -> dict[str, torch.Tensor]:
        names, seqs = [e.name for e in examples], [e.sequence for e in examples]
        out = {}
        for name, (store, array) in self.items.items():
            out[name] = store.batch(names, seqs, [array], max_len)[array].to(device)
        return out


class ProteinTask:
    """Protein inverse folding (masked diffusion + MPNN). A :class:`reed.domains.Domain`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def setup(self, *, device: torch.device, main_process_first, progress: bool, world: int = 1) -> Config:
        cfg = self.cfg
        self.splits = load_splits(cfg, progress=progress)
        self.train_set = self.splits["train"]
        if len(self.train_set) == 0:
            raise DataError(f"no training proteins in {cfg.protein.data.path}")

        def load(terms_cfg):
            targets = ProteinTargets(terms_cfg, self.train_set.examples)
            return targets, {name: targets.dim(name) for name in targets.items}

        cfg, self.targets = resolve_targets(cfg, load)
        self.epochs = EpochBatches(self.train_set.batches(cfg.protein.data.token_budget), seed=cfg.seed,
                                   world=world, grad_accum=cfg.train.grad_accum)
        self.steps_per_epoch = self.epochs.steps_per_epoch
        cfg = self.epochs.resolve_steps(cfg)
        self.process = build_process(cfg)
        self.cfg = cfg
        return cfg

    def fingerprint(self) -> str:
        """The training set's fingerprint (stored in checkpoints; resuming on other data is refused)."""
        return fingerprint([(ex.name, ex.sequence, ex.coords) for ex in self.train_set])

    def build_denoiser(self) -> MPNNDenoiser:
        den = build_mpnn_denoiser(self.cfg)
        valid = set(den.tap_names())
        for i, t in enumerate(self.cfg.targets):
            if t.depth not in valid:
                raise ConfigError(f"config key 'targets.{i}.depth' is {t.depth!r}; the protein denoiser's taps are "
                                  f"{sorted(valid)}")
            if (t.kind == "edges") != str(t.depth).endswith(".edges"):
                raise ConfigError(f"config key 'targets.{i}.kind' is '{t.kind}' but tap {t.depth!r} is "
                                  f"{'an edge' if str(t.depth).endswith('.edges') else 'a node'} tap")
        return den

    def build_objective(self) -> Objective:
        return build_objective(self.cfg, self.process, self.steps_per_epoch)

    def host_batches(self, step: int, rank: int, world: int) -> list:
        """This process's ``grad_accum`` token batches of ``step``, collated on the host (a data-loader worker):
        [(ProteinBatch, {target: tensor}), ...]."""
        out = []
        for idx in self.epochs.indices(step, rank):
            examples = [self.train_set[i] for i in idx]
            pb = collate(examples)
            out.append((pb, self.targets.batch(examples, pb.S.shape[1], "cpu") if self.targets.items else {}))
        return out

    def device_batch(self, host, device: torch.device, generator: torch.Generator):
        return to_device(host, device)

    def forward(self, module, pb, generator: torch.Generator | None, taps=()):
        """Corrupt the native sequences of ``pb`` and run ``module``: (corrupted, log_probs, hidden)."""
        c = self.process.corrupt(pb.S, pb.residue_mask, generator=generator)
        log_probs, hidden = module(pb.X, c.S_t, pb.mask, pb.residue_idx, pb.chain_encoding, taps=taps,
                                   generator=generator)
        return c, log_probs, hidden

    def loss(self, objective: Objective, module: ReedModule, batch, step: int, generator: torch.Generator):
        pb, z = batch
        c, log_probs, hidden = self.forward(module, pb, generator, taps=objective.taps)
        loss_gen = self.process.loss(log_probs, pb.S, pb.residue_mask, c)
        out = DenoiserOutput(loss_gen, c.t, hidden, token_mask=pb.residue_mask, edge_index=hidden["edge_index"],
                             edge_mask=hidden["edge_mask"])
        loss, parts = objective.combine(module, out, z, step)
        with torch.no_grad():
            m = c.is_masked.float()
            hit = (log_probs.argmax(-1) == pb.S).float()
            parts["acc_masked"] = (hit * m).sum() / m.sum().clamp_min(1.0)
        return loss, parts

    def eval_due(self, done: int) -> bool:
        every = self.cfg.protein.eval_every
        return every > 0 and done % (every * self.steps_per_epoch) == 0

    def evaluate(self, model: MPNNDenoiser, run_dir: Path, step: int, device: torch.device) -> dict:
        """Validation recovery (designed with the run's sampler settings) and perplexity at random t."""
        from reed.protein.design import evaluate_split

        ds = self.splits["valid"] if len(self.splits["valid"]) else self.train_set
        ex = ds.examples[: self.cfg.protein.eval_max_proteins]
        res = evaluate_split(model, self.cfg, ex, device=device, seed=self.cfg.seed,
                             fasta=run_dir / "samples" / f"valid_step_{step:07d}.fasta")
        return {"epoch": step / self.steps_per_epoch, **{f"valid/{k}": v for k, v in res.items()}}

    def title(self) -> str:
        m = self.cfg.protein.model
        return f"{self.cfg.objective.method}: {m.preset} (protein)"
