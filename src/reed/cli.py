"""The ``reed`` command.

    reed fit-encoder CONFIG [key=value ...]       fit the self-supervised encoder(s) the config's targets name
    reed prepare-targets CONFIG [key=value ...]   compute and cache every alignment target once
    reed train CONFIG [key=value ...] [--out DIR] [--resume]
    reed sample RUN_OR_CHECKPOINT --num N --out samples.npz [--sampler euler|heun|sde] [--steps S] [--cfg-scale W]
    reed show-config CONFIG [key=value ...]        print the resolved config

Errors on bad input (a config typo, a missing file, a corrupt checkpoint) print one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from reed.errors import ReedError


def _load(args) -> object:
    from reed.config import load_config

    return load_config(args.config, args.overrides)


def cmd_show_config(args) -> int:
    from reed.config import dump_config

    print(dump_config(_load(args)), end="")
    return 0


def cmd_fit_encoder(args) -> int:
    import torch

    from reed.data.images import load_dataset
    from reed.targets.fitted_encoder import fit_encoder, linear_probe_accuracy, save_encoder

    cfg = _load(args)
    todo = [t for t in cfg.targets if t.source == "fitted_encoder"]
    if not todo:
        print("no target with source 'fitted_encoder' in the config; nothing to fit")
        return 0
    ds = load_dataset(cfg.data)
    for tg in todo:
        out = Path(tg.path)
        if (out / "encoder.safetensors").is_file() and not args.force:
            print(f"encoder for target '{tg.name}' already fitted at {out} (use --force to refit)")
            continue
        f = cfg.fit
        torch.manual_seed(cfg.seed)
        enc, hist = fit_encoder(ds.images, dim=f.dim, width=f.width, downsample=f.downsample, steps=f.steps,
                                batch_size=f.batch_size, lr=f.lr, seed=cfg.seed, progress=cfg.train.progress)
        save_encoder(enc, out)
        with torch.no_grad():
            feats = enc.pooled(ds.images)
        acc = linear_probe_accuracy(feats.numpy(), ds.labels.numpy(), seed=cfg.seed)
        report = {"target": tg.name, "path": str(out), "vicreg_loss_first": hist[0], "vicreg_loss_last": hist[-1],
                  "linear_probe_accuracy": acc}
        (out / "fit_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"fitted encoder '{tg.name}' -> {out}: VICReg loss {hist[0]:.3f} -> {hist[-1]:.3f}, "
              f"linear-probe accuracy {acc:.3f}")
    return 0


def cmd_prepare_targets(args) -> int:
    from reed.data.images import load_dataset
    from reed.targets.prepare import prepare_targets

    cfg = _load(args)
    ds = load_dataset(cfg.data)
    out = prepare_targets(cfg.targets, ds, cfg.train.cache_dir, progress=cfg.train.progress)
    for name, z in out.items():
        print(f"target '{name}': {tuple(z.shape)}")
    return 0


def cmd_train(args) -> int:
    from reed.train import train

    cfg = _load(args)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    res = train(cfg, out, resume=args.resume, stop_at=args.stop_at)
    print(f"trained to step {res.step}; run directory {res.run_dir} (checkpoint {res.last_checkpoint})")
    return 0


def cmd_sample(args) -> int:
    from reed.generate import generate

    info = generate(args.run, num=args.num, out=args.out, sampler=args.sampler, steps=args.steps,
                    cfg_scale=args.cfg_scale, guidance=(args.guidance_low, args.guidance_high), seed=args.seed,
                    batch_size=args.batch_size, use_ema=not args.raw, labels=args.labels)
    print(f"wrote {info['num']} samples to {info['npz']} and a grid to {info['grid']}")
    return 0


def _process() -> tuple[int, int, object]:
    """(process index, number of processes, state) under `accelerate launch` (0, 1 when run plainly)."""
    from accelerate import PartialState

    st = PartialState()
    return st.process_index, st.num_processes, st


def cmd_embed(args) -> int:
    from reed.targets.embed import embed_target

    cfg = _load(args)
    rank, world, st = _process()
    rep = embed_target(cfg, args.target, args.out, dtype=args.dtype, shard_size=args.shard_size,
                       batch_size=args.batch_size, process_index=rank, num_processes=world,
                       progress=cfg.train.progress and rank == 0, barrier=st.wait_for_everyone)
    if rank == 0:
        print(f"target '{args.target}' {rep['shape']} x {rep['count']} -> {args.out} "
              f"({rep['written']} shards written here, {rep['skipped']} already there). Train with:\n"
              f"  targets.<i>.source=store targets.<i>.path={args.out}")
    return 0


def cmd_import(args) -> int:
    from reed.official import import_official

    ck = import_official(args.checkpoint, args.out, which=args.which, keep_projectors=args.keep_projectors,
                         num_heads=args.num_heads, vae=args.vae, latents=args.latents)
    print(f"imported {args.checkpoint} ({args.which} weights) -> {ck}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reed", description="Train diffusion/flow models with REED representation "
                                "guidance.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 model.depth=4")
        return sp

    with_config("show-config", "print the resolved config").set_defaults(func=cmd_show_config)
    sp = with_config("fit-encoder", "fit the self-supervised encoder(s) named by fitted_encoder targets")
    sp.add_argument("--force", action="store_true", help="refit even if the encoder exists")
    sp.set_defaults(func=cmd_fit_encoder)
    with_config("prepare-targets", "compute and cache all alignment targets").set_defaults(func=cmd_prepare_targets)
    sp = with_config("train", "train a model")
    sp.add_argument("--out", help="run directory (default runs/<config name>)")
    sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    sp.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)  # simulate an interruption
    sp.set_defaults(func=cmd_train)

    sp = with_config("embed", "compute one target over the data set into a sharded target store")
    sp.add_argument("--target", required=True, help="target name in the config")
    sp.add_argument("--out", required=True, help="store directory")
    sp.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    sp.add_argument("--shard-size", type=int, default=10_000)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.set_defaults(func=cmd_embed)

    sp = sub.add_parser("sample", help="generate samples from a run or checkpoint into an ADM-layout .npz")
    sp.add_argument("run", help="run directory or checkpoint directory")
    sp.add_argument("--num", type=int, default=100)
    sp.add_argument("--out", default=None, help="output .npz (default <run>/samples.npz)")
    sp.add_argument("--sampler", choices=["euler", "heun", "sde"], default=None)
    sp.add_argument("--steps", type=int, default=None)
    sp.add_argument("--cfg-scale", type=float, default=None)
    sp.add_argument("--guidance-low", type=float, default=None)
    sp.add_argument("--guidance-high", type=float, default=None)
    sp.add_argument("--labels", choices=["balanced", "random"], default="balanced")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    sp.set_defaults(func=cmd_sample)

    sp = sub.add_parser("import", help="import a released REPA/REED SiT checkpoint as a reed checkpoint")
    sp.add_argument("checkpoint", help="released .pt (bare state dict or {model, ema, args, ...}) or .safetensors")
    sp.add_argument("--out", required=True, help="directory to create (a reed run directory)")
    sp.add_argument("--which", choices=["ema", "model"], default="ema", help="weights to take from a training file")
    sp.add_argument("--keep-projectors", action="store_true", help="keep the alignment projectors")
    sp.add_argument("--num-heads", type=int, default=None, help="attention heads (default: SiT table by width)")
    sp.add_argument("--vae", default=None, help="VAE (dir or hub id) to decode samples with")
    sp.add_argument("--latents", default=None, help="prepared latents dir, to continue training")
    sp.set_defaults(func=cmd_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_flush_denormal(True)  # CPU: denormal floats slow small nets by 5-25x (measured on the demo)
    if args.command == "train" and args.resume and not args.out:
        args.out = str(Path("runs") / Path(args.config).stem)
    try:
        return args.func(args)
    except ReedError as e:
        print(f"reed {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reed {args.command}: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
