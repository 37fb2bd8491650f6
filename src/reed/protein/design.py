"""Sequence design with a trained protein run: sample sequences for backbones, score them, read/write FASTA.

FASTA records written here carry their provenance in the header, which ``reed evaluate`` reads back::

    >5L33_A sample=0 recovery=0.4312 source=/data/pdb/5L33.pdb
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from reed.config import Config
from reed.errors import DataError
from reed.io import atomic_write_text, eval_mode, progress_bar
from reed.protein.data import (
    ProteinExample,
    backbone_problem,
    collate,
    decode_sequence,
    encode_sequence,
    token_batches,
)
from reed.protein.metrics import RecoveryAccumulator, perplexity
from reed.sampling.masked import sample_masked


def _denoise_fn(model, pb):
    def denoise(S_t: torch.Tensor) -> torch.Tensor:
        return model(pb.X, S_t, pb.mask, pb.residue_idx, pb.chain_encoding)[0]

    return denoise


@torch.no_grad()
def design_sequences(model, cfg: Config, examples: Sequence[ProteinExample], *, num: int = 1,
                     steps: int | None = None, temperature: float | None = None, order: str | None = None,
                     seed: int = 0, device: str | torch.device = "cpu", budget: int | None = None,
                     progress: bool = False) -> list[dict]:
    """``num`` designed sequences per backbone in ``examples``.

    Sampler settings default to ``cfg.protein.sample``. Returns one record per design:
    {"name", "sample", "sequence" (str, X where the backbone is incomplete), "native", "recovery" (over residues
    with a complete backbone), "tokens" (L,) tensor, "mask" (L,) bool}.
    Designs are batched under the token budget and sampled together (one generator per batch), so they depend
    on ``seed`` and ``budget``.
    """
    for ex in examples:
        problem = backbone_problem(ex)
        if problem is not None:
            raise DataError(f"design_sequences: {ex.name}: {problem}")
    sc = cfg.protein.sample
    steps = steps or sc.steps
    temperature = sc.temperature if temperature is None else temperature
    order = order or sc.order
    budget = budget or cfg.protein.data.token_budget
    jobs = [(i, s) for i in range(len(examples)) for s in range(num)]
    batches = token_batches([len(examples[i]) for i, _ in jobs], budget)
    out: list[dict | None] = [None] * len(jobs)
    with eval_mode(model):
        for b in progress_bar(batches, progress, "design"):
            exs = [examples[jobs[j][0]] for j in b]
            pb = collate(exs, device=device)
            valid = pb.residue_mask.bool()
            # one generator per batch, seeded by its first design: results depend on the seed and the token budget
            g = torch.Generator(device=pb.S.device).manual_seed(seed * 1_000_003 + b[0])
            tokens = sample_masked(_denoise_fn(model, pb), valid, steps=steps, temperature=temperature, order=order,
                                   generator=g)
            for row, j in enumerate(b):
                i, s = jobs[j]
                L = len(examples[i])
                tok, m, nat = tokens[row, :L].cpu(), valid[row, :L].cpu(), pb.S[row, :L].cpu()
                rec = float(((tok == nat) & m).sum() / m.sum().clamp_min(1))
                out[j] = {"name": examples[i].name, "sample": s, "sequence": decode_sequence(tok),
                          "native": examples[i].sequence, "recovery": rec, "tokens": tok, "mask": m}
    return out  # type: ignore[return-value]


@torch.no_grad()
def evaluate_split(model, cfg: Config, examples: Sequence[ProteinExample], *, device="cpu", seed: int = 0,
                   fasta: str | Path | None = None, num: int = 1) -> dict[str, float]:
    """Recovery of designed sequences (pooled, per-protein median and mean) and perplexity/accuracy of one forward
    pass at random noise levels (a fixed generator), over ``examples``."""
    from reed.protein.task import build_process

    designs = design_sequences(model, cfg, examples, num=num, seed=seed, device=device)
    acc = RecoveryAccumulator()
    for d in designs:
        acc.update(d["tokens"][None], torch.from_numpy(encode_sequence(d["native"]))[None], d["mask"][None])
    res = dict(acc.compute())
    process = build_process(cfg)
    with eval_mode(model):
        g = torch.Generator(device=device).manual_seed(seed + 17)
        nll_sum, acc_sum, count = 0.0, 0.0, 0.0
        for b in token_batches([len(e) for e in examples], cfg.protein.data.token_budget):
            pb = collate([examples[i] for i in b], device=device)
            c = process.corrupt(pb.S, pb.residue_mask, generator=g)
            lp = process.log_probs(model(pb.X, c.S_t, pb.mask, pb.residue_idx, pb.chain_encoding)[0], c.S_t)
            n = float(pb.residue_mask.sum())
            p = perplexity(lp, pb.S, pb.residue_mask)
            nll_sum, acc_sum, count = nll_sum + p["nll"] * n, acc_sum + p["accuracy"] * n, count + n
    res["nll"] = nll_sum / max(count, 1.0)
    res["perplexity"] = float(torch.tensor(res["nll"]).exp())
    res["accuracy_random_t"] = acc_sum / max(count, 1.0)
    if fasta is not None:
        write_fasta(designs, fasta)
    return {k: (int(v) if k.startswith("num_") else float(v)) for k, v in res.items()}


def write_fasta(designs: Sequence[dict], path: str | Path, sources: dict[str, str] | None = None) -> Path:
    """Write design records (from :func:`design_sequences`) as FASTA, 80 letters a line; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for d in designs:
        head = f">{d['name']} sample={d['sample']} recovery={d['recovery']:.4f}"
        if sources and d["name"] in sources:
            head += f" source={sources[d['name']]}"
        lines.append(head)
        seq = d["sequence"]
        lines.extend(seq[i : i + 80] for i in range(0, len(seq), 80))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def read_fasta(path: str | Path) -> list[dict]:
    """Records {"name", "sequence", "fields": {key: value from the header}} of a FASTA file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"FASTA file not found: {path}")
    records: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read FASTA file ({exc})") from exc
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            parts = line[1:].split()
            if not parts:
                raise DataError(f"{path}:{n}: FASTA header without a name")
            fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
            records.append({"name": parts[0], "sequence": "", "fields": fields})
        elif not records:
            raise DataError(f"{path}:{n}: sequence line before the first '>' header")
        else:
            records[-1]["sequence"] += line
    if not records:
        raise DataError(f"{path} holds no FASTA records")
    return records


__all__ = ["design_sequences", "evaluate_split", "write_fasta", "read_fasta"]
