"""The protein side of the ``reed`` command: ``embed-protein``, and ``sample`` / ``evaluate`` for protein runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from reed.cli import Commands, print_report
from reed.errors import ConfigError, DataError
from reed.io import pick_device


def _structure_files(paths: list[str]) -> list[Path]:
    from reed.protein.data import structure_kind

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and structure_kind(f) is not None)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"structure file or directory not found: {p}")
    if not files:
        raise DataError(f"no PDB/mmCIF files in {paths}")
    return files


def refuse_without_backbone(example, source, hint: str = "") -> None:
    """A :class:`DataError` naming ``source`` and the chain when no residue of ``example`` has a complete backbone
    (its design would be all ``X``, its recovery undefined)."""
    from reed.protein.data import backbone_problem

    problem = backbone_problem(example)
    if problem is not None:
        raise DataError(f"{source}: chain {example.chain_ids[0]}: {problem}; nothing to design or score{hint}")


def load_structures(paths: list[str], *, mode: str = "chain", chains: list[str] | None = None):
    """(examples, {example name: source file}) parsed from files/directories; a chain without any complete
    backbone residue is refused by name."""
    from reed.protein.data import merge_chains, parse_structure

    examples, sources = [], {}
    for f in _structure_files(paths):
        exs = parse_structure(f, chains=chains)
        for e in exs:
            refuse_without_backbone(e, f, " (leave it out with --chains)")
        if mode == "complex" and len(exs) > 1:
            exs = [merge_chains(exs, name=f.name.split(".")[0])]
        for e in exs:
            examples.append(e)
            sources[e.name] = str(f.resolve())
    return examples, sources


def sample_protein(args, model, cfg, device: str) -> int:
    """``reed sample RUN --structures ...``: design sequences for the given backbones, FASTA out."""
    from reed.protein.design import design_sequences, write_fasta

    if not args.structures:
        raise ConfigError("this is a protein run: give the backbones to design for with --structures FILE/DIR ...")
    examples, sources = load_structures(args.structures, mode=cfg.protein.data.mode, chains=args.chains)
    designs = design_sequences(model, cfg, examples, num=args.num, steps=args.steps, temperature=args.temperature,
                               order=args.order, seed=args.seed, device=device, progress=True)
    out = Path(args.out or Path(args.run) / "designs.fasta")
    write_fasta(designs, out, sources)
    rec = [d["recovery"] for d in designs]
    print(f"wrote {len(designs)} designs for {len(examples)} chains to {out} "
          f"(recovery vs native: mean {sum(rec) / len(rec):.3f})")
    return 0


def evaluate_protein_fasta(args) -> dict:
    """Recovery of the designs in a FASTA written by ``reed sample`` against their native structures; optional
    ESMFold refolding (``--refold``)."""
    import numpy as np
    import torch

    from reed.protein.data import encode_sequence, parse_structure
    from reed.protein.design import read_fasta
    from reed.protein.metrics import RecoveryAccumulator

    records = read_fasta(args.samples)
    natives: dict[str, object] = {}
    acc = RecoveryAccumulator()
    designs, native_ca, masks = [], [], []
    for r in records:
        src = r["fields"].get("source")
        if r["name"] not in natives:
            if not src:
                raise DataError(f"{args.samples}: record '{r['name']}' has no source=<structure file> in its header")
            found = {e.name: e for e in parse_structure(src)}
            if r["name"] not in found:
                raise DataError(f"{args.samples}: chain '{r['name']}' not found in {src} (has {sorted(found)})")
            refuse_without_backbone(found[r["name"]], src)
            natives[r["name"]] = found[r["name"]]
        nat = natives[r["name"]]
        if len(r["sequence"]) != len(nat.sequence):
            raise DataError(f"{args.samples}: design '{r['name']}' has {len(r['sequence'])} residues, the native "
                            f"chain in {src} has {len(nat.sequence)}")
        m = torch.from_numpy(nat.residue_mask)
        acc.update(torch.from_numpy(encode_sequence(r["sequence"]))[None],
                   torch.from_numpy(encode_sequence(nat.sequence))[None], m[None])
        designs.append(r["sequence"])
        native_ca.append(np.asarray(nat.coords[:, 1]))
        masks.append(nat.residue_mask)
    result: dict = {"designs": str(args.samples), "num_designs": len(records), **acc.compute()}
    if args.refold:
        from reed.protein.metrics import ESMFoldRefolder, refold_metrics

        refolder = ESMFoldRefolder(args.refold, device=str(pick_device(None)))
        result["refold"] = refold_metrics(designs, native_ca, masks, refolder)
    return result


def evaluate_protein_run(args, run: Path) -> dict:
    """Design and score a split of a protein run's data (``reed evaluate RUN --split test``)."""

    from reed.domains import load_denoiser
    from reed.protein.design import evaluate_split
    from reed.protein.task import load_splits

    device = str(pick_device(None))
    model, cfg, ckpt = load_denoiser(run, use_ema=True, device=device)
    split = args.split or "test"
    examples = load_splits(cfg)[split].examples
    if not examples:
        raise DataError(f"the '{split}' split of {cfg.protein.data.path} is empty")
    fasta = Path(args.out).with_suffix(".fasta") if args.out else run / f"designs_{split}.fasta"
    res = evaluate_split(model, cfg, examples, device=device, seed=args.seed, fasta=fasta)
    return {"run": str(run), "checkpoint": str(ckpt), "split": split, "num_proteins": len(examples),
            "designs": str(fasta), **res}


def read_chain_clusters(list_csv: Path) -> dict[str, str]:
    """CHAINID -> CLUSTER from ProteinMPNN's ``list.csv`` (or REED's ``list_filtered.csv``)."""
    if not list_csv.is_file():
        raise DataError(f"{list_csv}: index file not found (config key 'protein.data.chain_list')")
    try:
        with list_csv.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{list_csv}: not a CSV index file ({exc})") from exc
    if not rows or "CHAINID" not in rows[0] or "CLUSTER" not in rows[0]:
        raise DataError(f"{list_csv} must have CHAINID and CLUSTER columns")
    return {r["CHAINID"]: str(r["CLUSTER"]).strip() for r in rows}


def embed_protein(args, cfg) -> int:
    """``reed embed-protein CONFIG --source esm2|af3 --out STORE``: targets for every example of the run's data."""
    from reed.protein.task import load_splits

    splits = load_splits(cfg, progress=True)
    examples = [e for s in ("train", "valid", "test") for e in splits[s].examples]
    names, seqs = [e.name for e in examples], [e.sequence for e in examples]
    if args.source == "esm2":
        from reed.protein.targets.esm2 import embed_proteins_esm2

        store = embed_proteins_esm2(names, seqs, args.out, model=args.model, layer=args.layer,
                                    pair=None if args.pair == "none" else args.pair,
                                    device=args.device, progress=True)
    else:
        from reed.protein.targets.af3 import import_af3_embeddings, read_af3_job_sequence

        if not args.af3_dir:
            raise ConfigError("--source af3 needs --af3-dir (AlphaFold3 output directory)")
        jobs: dict[str, str]
        if args.jobs:
            jobs = json.loads(Path(args.jobs).read_text())
        elif cfg.protein.data.format == "pdb_2021aug02":
            clusters = read_chain_clusters(cfg.protein.data.index_file())
            jobs = {n: f"cluster_{clusters[n]}" for n in names if n in clusters}
        else:
            raise ConfigError("give --jobs JSON {example name: AF3 job name} for a directory data set")
        chains, unknown = {}, []
        for n in names:
            if n not in jobs:
                continue
            folded = read_af3_job_sequence(Path(args.af3_dir) / jobs[n])
            if folded is None:  # without the folded sequence the arrays cannot be matched to the chain safely
                unknown.append(jobs[n])
                continue
            chains[n] = (jobs[n], folded)
        if unknown:
            raise DataError(f"{len(unknown)} AF3 jobs have no <job>_data.json with the folded sequence, e.g. "
                            f"{unknown[:5]}; keep AlphaFold3's data JSON next to the embeddings")
        store = import_af3_embeddings(args.af3_dir, args.out, chains=chains, progress=True)
    print(f"protein targets {store.dims} for {len(store)} examples -> {args.out}")
    return 0


def cmd_sample(args) -> int:
    """``reed sample RUN --structures ...`` for a protein run."""
    from reed.domains import load_denoiser

    device = str(pick_device(None))
    model, cfg, _ = load_denoiser(args.run, use_ema=not args.raw, device=device)
    args.num = args.num or 1
    return sample_protein(args, model, cfg, device)


def owns_samples(path: Path) -> bool:
    """Designs (.fasta) or a protein run directory (designs its --split)."""
    from reed.domains import run_domain

    return path.suffix.lower() in (".fasta", ".fa") or (path.is_dir() and run_domain(path) == "protein")


def cmd_evaluate(args) -> int:
    samples = Path(args.samples)
    result = evaluate_protein_run(args, samples) if samples.is_dir() else evaluate_protein_fasta(args)
    return print_report(result, args.out)


def add_commands(commands: Commands) -> None:
    """The protein domain's commands and its flags of ``sample`` / ``evaluate``."""
    sp = commands.command("embed-protein", "protein targets for every chain of a protein config's data: ESM-2 or "
                          "AF3", embed_protein, config=True)
    sp.add_argument("--source", choices=["esm2", "af3"], default="esm2")
    sp.add_argument("--out", required=True, help="protein target store directory")
    sp.add_argument("--model", default="facebook/esm2_t33_650M_UR50D", help="ESM-2 hub id or local dir")
    sp.add_argument("--layer", type=int, default=-1, help="ESM-2 hidden layer for 'single' (-1 = last)")
    sp.add_argument("--pair", choices=["attention", "none"], default="attention",
                    help="ESM-2 pair target: symmetrised attention maps of all layers and heads, or none")
    sp.add_argument("--af3-dir", default=None, help="AlphaFold3 output dir (cluster_<id>/seed-0_embeddings/...)")
    sp.add_argument("--jobs", default=None, help="JSON {example name: AF3 job name} (default: cluster_<CLUSTER> from "
                    "protein.data.chain_list)")
    sp.add_argument("--device", default=str(pick_device()))
    sp = commands.shared("sample")
    sp.add_argument("--structures", nargs="+", default=None,
                    help="protein runs: PDB/mmCIF files or directories to design sequences for (--num per chain)")
    sp.add_argument("--chains", nargs="+", default=None, help="protein runs: only these chain ids")
    sp.add_argument("--temperature", type=float, default=None, help="protein runs: sampling temperature")
    sp.add_argument("--order", choices=["random", "confidence"], default=None,
                    help="protein runs: unmasking order (random = exact reverse process; confidence = purity)")
    sp = commands.shared("evaluate")
    sp.add_argument("--split", choices=["train", "valid", "test"], default=None, help="protein run: split to design")
    sp.add_argument("--refold", default=None, help="protein: ESMFold model dir/hub id to refold designs (RMSD/TM)")
