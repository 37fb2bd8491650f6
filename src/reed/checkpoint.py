"""Checkpoints: safetensors weights + JSON state, written atomically, validated on load.

Layout of one checkpoint directory ``<run>/checkpoints/step_0000500/``::

    model.safetensors      trainable module (``denoiser.*`` and ``projectors.<name>.*``)
    ema.safetensors        EMA of the denoiser (its own keys, no prefix)
    optimizer.safetensors  optimizer tensors (``state.<param index>.<name>``) and RNG states (``rng.*``)
    state.json             step, optimizer param groups and scalar state, scheduler, numpy/python RNG, metadata
                           (``extra``: method, ``loss`` of the last step, ``finite``: all weights finite,
                           ``data``: the training set's fingerprint)
    config.yaml            the resolved run config
    checksums.json         sha256 of each file above, written last; verified when a file is loaded, so flipped
                           bytes name the file instead of loading and producing NaN (checkpoints written before
                           this file existed load unverified)

The directory is first written under a unique temporary name (:func:`reed.io.temp_name`, files inside written with
:mod:`reed.io`) and then renamed, so an interrupted save never leaves a half checkpoint; ``<run>/checkpoints/latest``
names the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from reed.errors import CheckpointError
from reed.io import atomic_save_safetensors, atomic_write_text, file_sha256, temp_name

WEIGHT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
CHECKSUMS = "checksums.json"


def step_dirname(step: int) -> str:
    return f"step_{step:07d}"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _optimizer_to_flat(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt_state["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{name}"] = val
            else:
                scalars.setdefault(str(idx), {})[name] = val
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states: torch (CPU and CUDA) as tensors, numpy and python as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in meta:
        n = meta["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "python" in meta:
        p = meta["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(run_dir: Path, step: int, *, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                    optimizer: dict[str, Any], scheduler: dict[str, Any] | None, config_yaml: str,
                    extra: dict[str, Any] | None = None, keep: int = 0) -> Path:
    """Write checkpoint ``step`` atomically under ``run_dir/checkpoints`` and prune to the newest ``keep`` (0 = all)."""
    ck_root = Path(run_dir) / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / step_dirname(step)
    tmp = temp_name(final)  # unique per process and call; a leftover one is recognised by is_temp_name
    tmp.mkdir()
    try:
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        rng_tensors, rng_meta = capture_rng()
        atomic_save_safetensors(tmp / "model.safetensors", _contiguous(model))
        atomic_save_safetensors(tmp / "ema.safetensors", _contiguous(ema))
        atomic_save_safetensors(tmp / "optimizer.safetensors", _contiguous({**opt_tensors, **rng_tensors}))
        state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler, "rng": rng_meta, "extra": extra or {}}
        atomic_write_text(tmp / "state.json", json.dumps(state))
        atomic_write_text(tmp / "config.yaml", config_yaml)
        sums = {f: file_sha256(tmp / f) for f in (*WEIGHT_FILES, "state.json", "config.yaml")}
        atomic_write_text(tmp / CHECKSUMS, json.dumps(sums, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step: move the old one aside first
        old = temp_name(ck_root / f"old-{step_dirname(step)}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    atomic_write_text(ck_root / "latest", final.name + "\n")
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def verify_file(path: Path) -> None:
    """Check ``path`` (a file of a checkpoint directory) against the directory's ``checksums.json``; a mismatch
    raises CheckpointError naming the file. Files of checkpoints without ``checksums.json`` pass unchecked."""
    sums_path = path.parent / CHECKSUMS
    if not sums_path.is_file():
        return
    try:
        sums = json.loads(sums_path.read_text())
        expected = sums.get(path.name) if isinstance(sums, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file is corrupt: {sums_path} ({e})") from None
    if expected is not None and file_sha256(path) != expected:
        raise CheckpointError(f"checkpoint file is corrupt: {path} (its sha256 differs from the one in "
                              f"{CHECKSUMS}; the file was changed or damaged after it was saved)")


def remove_stale_saves(run_dir: Path) -> list[Path]:
    """Remove what interrupted saves left in ``run_dir/checkpoints`` (temporary checkpoint directories and
    temporary files); returns what was removed. Call only while no other process saves into this run."""
    from reed.io import stale_temps

    removed = []
    for root in (Path(run_dir) / "checkpoints", Path(run_dir)):
        for p in stale_temps(root):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def last_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` written at a finite loss with finite weights (``state.json``'s
    ``extra.finite``; checkpoints that do not record it count as good), or None."""
    for ck in reversed(list_checkpoints(run_dir)):
        try:
            extra = read_state(ck).get("extra", {})
        except CheckpointError:
            continue
        if extra.get("finite", True):
            return ck
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (newest checkpoint), a ``checkpoints`` dir or the dir itself."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}")
    if (p / "state.json").is_file() or (p / "model.safetensors").is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            name = latest.read_text(errors="replace").strip()
            cand = root / name
            # `latest` names a directory of this checkpoints folder, nothing else (no paths, no links out)
            if name.startswith("step_") and "/" not in name and cand.is_dir() and not cand.is_symlink():
                return cand
        found = list_checkpoints(root.parent) if root.name == "checkpoints" else []
        if found:
            return found[-1]
    raise CheckpointError(f"no checkpoint found in {p} (expected <run>/checkpoints/step_*/ or a checkpoint directory)")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    verify_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file is corrupt or unreadable: {path} ({e})") from None


def read_config_text(ckpt: Path) -> str:
    p = Path(ckpt) / "config.yaml"
    if not p.is_file():
        raise CheckpointError(f"checkpoint file missing: {p}")
    verify_file(p)
    try:
        return p.read_text()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"checkpoint file is corrupt: {p} ({e})") from None


def read_state(ckpt: Path) -> dict[str, Any]:
    p = Path(ckpt) / "state.json"
    if not p.is_file():
        raise CheckpointError(f"checkpoint file missing: {p}")
    verify_file(p)
    try:
        state = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file is corrupt: {p} ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"checkpoint file is corrupt: {p} (expected an object with a non-negative integer "
                              f"'step', got {type(state).__name__})")
    for key, kind in (("optimizer", dict), ("rng", dict), ("extra", dict), ("scheduler", (dict, type(None)))):
        if key in state and not isinstance(state[key], kind):
            raise CheckpointError(f"checkpoint file is corrupt: {p} ('{key}' has the wrong type)")
    return state


def load_weights(ckpt: Path, which: str = "model") -> dict[str, torch.Tensor]:
    """Tensors of ``model``/``ema``/``optimizer`` from a checkpoint directory (CheckpointError if missing/corrupt)."""
    return _load_tensors(Path(ckpt) / f"{which}.safetensors")


def load_optimizer_state(ckpt: Path, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(optimizer state_dict, rng tensors) from a checkpoint."""
    tensors = load_weights(ckpt, "optimizer")
    meta = state.get("optimizer")
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError(f"checkpoint file is corrupt: {Path(ckpt) / 'state.json'} (no optimizer param groups)")
    opt = _optimizer_from_flat(tensors, meta)
    return opt, {k: v for k, v in tensors.items() if k.startswith("rng.")}


def load_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(weights)`` with a CheckpointError naming the source and the mismatched keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    bad_shape = [f"{k}: {tuple(weights[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
                 if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"weights in {source} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {bad_shape[:5]}"
        )
    module.load_state_dict(weights)
