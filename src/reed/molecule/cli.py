"""The molecule side of the ``reed`` command: ``fit-encoder``, ``sample`` and ``evaluate`` for molecule runs."""

from __future__ import annotations

import json
from pathlib import Path

from reed.cli import Commands, print_report
from reed.errors import ConfigError, DataError
from reed.io import pick_device
from reed.molecule.config import AROMATIC_RULES


def fit_encoders(cfg, force: bool = False) -> int:
    """``reed fit-encoder CONFIG`` for molecules: a denoising-pretrained equivariant encoder per ``fitted`` target,
    fitted on the training split."""

    from reed.molecule.targets import MoleculeEncoderConfig, fit_molecule_encoder
    from reed.molecule.task import load_molecule_splits

    todo = [t for t in cfg.targets if t.source == "molecule_encoder" and t.encoder == "fitted"]
    if not todo:
        print("no target with source 'molecule_encoder' and encoder 'fitted' in the config; nothing to fit")
        return 0
    train = load_molecule_splits(cfg, progress=cfg.train.progress)["train"]
    f = cfg.molecule.fit
    device = str(pick_device(None))
    for tg in todo:
        out = Path(tg.path)
        if (out / "encoder.safetensors").is_file() and not force:
            print(f"encoder for target '{tg.name}' already fitted at {out} (use --force to refit)")
            continue
        ec = MoleculeEncoderConfig(hidden=f.width, steps=f.steps, lr=f.lr, seed=cfg.seed)
        rep = fit_molecule_encoder(train, out, ec, progress=cfg.train.progress, device=device)
        print(f"fitted molecule encoder '{tg.name}' -> {out}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rep.items()
            if isinstance(v, (int, float))))
    return 0


def cmd_sample(args) -> int:
    """``reed sample RUN --num N --out mols.sdf``: molecules with atom counts from the training set, as SDF, a PNG
    grid of 2D depictions and a JSON of the settings."""
    from reed.domains import load_denoiser
    from reed.molecule.chem import real_elements
    from reed.molecule.dataset import MoleculeDataset
    from reed.molecule.metrics import depiction_grid, write_sdf
    from reed.molecule.task import generate_molecules, load_molecule_splits

    # refuse bad arguments before loading anything or sampling
    if args.num is not None and args.num < 1:
        raise ConfigError(f"--num must be >= 1 (molecules to sample), got {args.num}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1 (sampling steps), got {args.steps}")
    out = Path(args.out or Path(args.run) / "samples.sdf")
    if out.suffix.lower() != ".sdf":
        raise ConfigError(f"molecule samples are written as SDF: --out must end in .sdf, got {out}")
    device = str(pick_device(None))
    model, cfg, _ = load_denoiser(args.run, use_ema=not args.raw, device=device)
    train = load_molecule_splits(cfg)["train"]
    num = args.num or 100
    mols = generate_molecules(model, cfg, tuple(cfg.molecule.elements), train.atom_count_distribution(), num,
                              seed=args.seed, device=device, steps=args.steps, progress=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = write_sdf(mols, out)
    # every molecule (valid or not, generated PAD/MASK atoms as atomic number 0) also as arrays, so evaluation
    # sees the invalid ones too
    MoleculeDataset(mols, real_elements(cfg.molecule.elements), name=out.stem).save(out.with_suffix(".npz"))
    depiction_grid(mols[:48], out.with_suffix(".png"))
    settings = {"run": str(args.run), "num": num, "seed": args.seed, "steps": args.steps or cfg.molecule.sample.steps,
                "grid": cfg.molecule.sample.grid, "eta": cfg.molecule.sample.eta, "valid_written": written}
    out.with_suffix(".json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"wrote {written} valid of {num} molecules to {out}, all {num} to {out.with_suffix('.npz')}, "
          f"a grid to {out.with_suffix('.png')}")
    return 0


def _read_samples(path: Path) -> tuple[list, str]:
    """(molecules, the file read): the ``.npz`` arrays written next to an ``.sdf`` by ``reed sample`` (they hold
    the invalid molecules too), else the SDF itself. Refuses a file that yields no molecule, naming it."""
    from reed.molecule.dataset import MoleculeDataset

    arrays = path.with_suffix(".npz")
    if arrays.is_file():
        ds, source = MoleculeDataset.load(arrays), arrays
    elif path.is_file():
        ds, source = MoleculeDataset.from_sdf(path), path
    else:
        raise DataError(f"molecule samples not found: {path}")
    if len(ds) == 0:
        why = "it is empty"
        if ds.skipped:
            name, reason = ds.skipped[0]
            why = f"{len(ds.skipped)} record(s) unreadable, first: {name}: {reason}"
        raise DataError(f"{source}: no molecules to score ({why})")
    return ds.molecules, str(source)


def evaluate(args) -> dict:
    """``reed evaluate mols.sdf|mols.npz [--run RUN] [--energy] [--aromatic RULE]``: stability, validity,
    uniqueness, novelty (against the run's training set) and optionally MMFF energy / strain. The aromatic rule of
    the stability metrics is ``--aromatic``, else the run's ``molecule.aromatic_rule``, else ``intended``; the
    result names it (``aromatic_rule``)."""
    from reed.molecule.metrics import molecule_metrics

    mols, source = _read_samples(Path(args.samples))
    train_smiles = None
    rule = getattr(args, "aromatic", None)
    if args.run:
        from reed.checkpoint import read_config_text, resolve_checkpoint
        from reed.config import config_from_yaml_text
        from reed.molecule.task import load_molecule_splits

        ck = resolve_checkpoint(args.run)
        cfg = config_from_yaml_text(read_config_text(ck), str(ck))
        if cfg.domain != "molecule":
            raise ConfigError(f"--run {args.run} is a {cfg.domain} run, not a molecule run")
        rule = rule or cfg.molecule.aromatic_rule
        train_smiles = load_molecule_splits(cfg)["train"].smiles_set(progress=True)
    res = molecule_metrics(mols, train_smiles, energy=args.energy, progress=True, aromatic=rule or "intended")
    return {"samples": source, **res}


def owns_samples(path: Path) -> bool:
    """Molecules written by ``reed sample``: the .sdf, or its .npz arrays next to it."""
    suffix = path.suffix.lower()
    return suffix == ".sdf" or (suffix == ".npz" and path.with_suffix(".sdf").is_file())


def cmd_evaluate(args) -> int:
    return print_report(evaluate(args), args.out)


def add_commands(commands: Commands) -> None:
    """The molecule domain's commands and its flags of ``evaluate``."""
    sp = commands.command("fit-encoder", "fit the self-supervised encoder(s) the config's targets name",
                          lambda args, cfg: fit_encoders(cfg, force=args.force), config=True)
    sp.add_argument("--force", action="store_true", help="refit even if the encoder exists")
    ev = commands.shared("evaluate")
    ev.add_argument("--energy", action="store_true", help="molecules: MMFF energy and strain (slow for many)")
    ev.add_argument("--aromatic", choices=AROMATIC_RULES, default=None,
                    help="molecules: aromatic bonds count 1.5 toward valence, floored ('intended', the default "
                    "without --run) or 1 ('reference': what the reference's code computes, the paper's numbers); "
                    "default: the run's molecule.aromatic_rule")
