"""The ``reed`` command: the shared commands, and each registered domain's own.

    reed train CONFIG [key=value ...] [--out DIR] [--resume]
    reed sample RUN_OR_CHECKPOINT [--num N] [--out FILE] ...   samples of the run's domain
    reed evaluate SAMPLES [...]                                metrics of the samples' domain
    reed show-config CONFIG [key=value ...]                    print the resolved config

Each domain adds its commands and its flags of ``sample`` / ``evaluate`` (see :class:`Commands`): the image
domain ``fit-encoder``, ``prepare-targets``, ``prepare``, ``caption``, ``embed``, ``embed-text``, ``import``; the
protein domain ``embed-protein``; the molecule domain ``fit-encoder``. A command that takes a config refuses a
config of another domain with one line.

Errors on bad input (a config typo, a missing file, a corrupt checkpoint) print one line naming the problem.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reed.errors import ConfigError, ReedError


def load_args_config(args) -> Any:
    """The config of a command's ``config`` and ``overrides`` arguments."""
    from reed.config import load_config

    return load_config(args.config, args.overrides)


class _Flags:
    """A parser shared by several domains: a flag another domain already added is kept, not added twice."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser

    def add_argument(self, *names: str, **kw: Any) -> None:
        if any(n in self.parser._option_string_actions for n in names if n.startswith("-")):
            return
        self.parser.add_argument(*names, **kw)


class Commands:
    """What a domain's ``add_commands`` receives.

    ``command(name, help, handler)`` adds ``reed NAME`` (``handler(args) -> exit code``); with
    ``config=True`` it takes ``CONFIG [key=value ...]`` and runs ``handler(args, cfg)`` of the config's domain, so
    two domains may offer the same command (``fit-encoder``) and a third domain's config gets a clear error.
    ``shared(name)`` is the parser of ``sample`` / ``evaluate``, to add the domain's flags to.
    Both return an object with ``add_argument`` that skips a flag already added by another domain.
    """

    def __init__(self, sub: argparse._SubParsersAction):
        self.sub = sub
        self.parsers: dict[str, argparse.ArgumentParser] = {}
        self.domain = ""

    def _parser(self, name: str, help_: str) -> argparse.ArgumentParser:
        if name not in self.parsers:
            self.parsers[name] = self.sub.add_parser(name, help=help_)
        return self.parsers[name]

    def command(self, name: str, help_: str, handler: Callable[..., int], *, config: bool = False) -> _Flags:
        new = name not in self.parsers
        sp = self._parser(name, help_)
        if config:
            if new:
                sp.add_argument("config", help="YAML config file")
                sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
                sp.set_defaults(func=_dispatch_config, handlers={})
            handlers = sp.get_default("handlers")
            if handlers is None:
                raise ValueError(f"reed {name} is a command without a config; it cannot be shared")
            handlers[self.domain] = handler
        else:
            if not new:
                raise ValueError(f"two domains add the command 'reed {name}'")
            sp.set_defaults(func=handler)
        return _Flags(sp)

    def shared(self, name: str) -> _Flags:
        return _Flags(self.parsers[name])


def _dispatch_config(args) -> int:
    cfg = load_args_config(args)
    handler = args.handlers.get(cfg.domain)
    if handler is None:
        raise ConfigError(f"`reed {args.command}` is a command of {' and '.join(sorted(args.handlers))} runs, but "
                          f"{args.config} has domain '{cfg.domain}'")
    return handler(args, cfg)


def cmd_show_config(args) -> int:
    from reed.config import dump_config

    print(dump_config(load_args_config(args)), end="")
    return 0


def cmd_train(args) -> int:
    from reed.train import train

    cfg = load_args_config(args)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    res = train(cfg, out, resume=args.resume, overwrite=args.overwrite, allow_data_change=args.allow_data_change,
                stop_at=args.stop_at)
    print(f"trained to step {res.step}; run directory {res.run_dir} (checkpoint {res.last_checkpoint})")
    return 0


# flags that must be >= 1 wherever a command has them (None: the command's default)
POSITIVE_FLAGS = {"num": "--num", "steps": "--steps", "batch_size": "--batch-size"}


def check_args(args) -> None:
    """Checks shared by every command: positive counts, and an ``--out`` file of ``sample`` / ``evaluate`` that
    is not a directory (its parent directory is created)."""
    for attr, flag in POSITIVE_FLAGS.items():
        val = getattr(args, attr, None)
        if val is not None and val < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {val}")
    out = getattr(args, "out", None)
    if args.command in ("sample", "evaluate") and out:
        p = Path(out)
        if p.is_dir():
            raise ConfigError(f"--out {p} is a directory; give a file name")
        parent = next((q for q in p.parents if q.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ConfigError(f"--out {p}: {parent} is a file, not a directory")
        p.parent.mkdir(parents=True, exist_ok=True)


def cmd_sample(args) -> int:
    """``reed sample RUN``: the handler of the run's domain."""
    from reed.checkpoint import resolve_checkpoint
    from reed.domains import get_domain, run_domain

    domain = run_domain(args.run)
    if domain is None:
        resolve_checkpoint(args.run)  # raises the error that says what is missing
        raise ConfigError(f"no readable config in the run {args.run}")
    spec = get_domain(domain)
    if spec.sample is None:
        raise ConfigError(f"{domain} runs cannot be sampled with `reed sample`")
    return spec.sample(args)


def cmd_evaluate(args) -> int:
    """``reed evaluate SAMPLES``: the handler of the first domain that claims the samples, else the default's."""
    from reed.config import DEFAULT_DOMAIN
    from reed.domains import loaded_domains

    samples = Path(args.samples)
    specs = loaded_domains()
    spec = next((s for s in specs if s.owns_samples is not None and s.owns_samples(samples)), None)
    spec = spec or next(s for s in specs if s.name == DEFAULT_DOMAIN)
    if spec.evaluate is None:
        raise ConfigError(f"{spec.name} samples cannot be evaluated with `reed evaluate`")
    return spec.evaluate(args)


def print_report(result: dict, out: str | None) -> int:
    """Print an evaluation result as JSON and also write it to ``out`` when given."""
    import json

    from reed.io import atomic_write_text

    text = json.dumps(result, indent=2, default=str)
    if out:
        atomic_write_text(Path(out), text + "\n")
    print(text)
    return 0


def process_info() -> tuple[int, int, object]:
    """(process index, number of processes, state) under `accelerate launch` (0, 1 when run plainly)."""
    import torch
    from accelerate import PartialState

    # without CUDA, cpu=True lets torchrun / MPI launches run as several CPU processes (gloo)
    st = PartialState(cpu=not torch.cuda.is_available())
    return st.process_index, st.num_processes, st


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line ``reed: warning: <message>`` (no source line) on the command line."""
    text = " ".join(str(message).split())
    return f"reed: warning: {text}\n"


def build_parser() -> argparse.ArgumentParser:
    from reed.domains import loaded_domains

    p = argparse.ArgumentParser(prog="reed", description="Train diffusion/flow models with REED representation "
                                "guidance.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 image.model.depth=4")
        return sp

    with_config("show-config", "print the resolved config").set_defaults(func=cmd_show_config)
    sp = with_config("train", "train a model")
    sp.add_argument("--out", help="run directory (default runs/<config name>)")
    sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    sp.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start anew")
    sp.add_argument("--allow-data-change", action="store_true",
                    help="with --resume: continue on training data that differ from the checkpoint's")
    sp.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)  # simulate an interruption
    sp.set_defaults(func=cmd_train)

    commands = Commands(sub)
    sp = commands._parser("sample", "generate samples from a run (images: ADM-layout .npz; proteins: designed "
                          "sequences; molecules: .sdf + grid)")
    sp.add_argument("run", help="run directory or checkpoint directory")
    sp.add_argument("--num", "--num-samples", dest="num", type=int, default=None,
                    help="number of samples (default 100; protein runs: designs per chain, default 1); "
                    "--num-samples under torchrun, whose own --numa options clash")
    sp.add_argument("--out", default=None, help="output file (default in the run directory)")
    sp.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's config)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    sp.set_defaults(func=cmd_sample)
    sp = commands._parser("evaluate", "metrics of samples: images (FID/sFID/IS/PR/FD_DINOv2, in-domain), "
                          "proteins (recovery of designs or of a run's split), molecules (stability, validity, ...)")
    sp.add_argument("samples", help="samples written by `reed sample` (images .npz, designs .fasta, molecules "
                    ".sdf) or a protein run directory")
    sp.add_argument("--run", default=None, help="the run the samples came from (in-domain metrics, novelty)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--out", default=None, help="write the results JSON here")
    sp.set_defaults(func=cmd_evaluate)
    for spec in loaded_domains():
        if spec.add_commands is not None:
            commands.domain = spec.name
            spec.add_commands(commands)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' fork warning under DataLoader workers
    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    import torch

    torch.set_flush_denormal(True)  # CPU: denormal floats slow small nets by 5-25x (measured on the demo)
    if args.command == "train" and args.resume and not args.out:
        args.out = str(Path("runs") / Path(args.config).stem)
    try:
        check_args(args)
        return args.func(args)
    except ReedError as e:
        msg = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())  # one line, whatever the message
        print(f"reed {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command reads or writes: permissions, disk full, a path that is a directory
        print(f"reed {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reed {args.command}: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
