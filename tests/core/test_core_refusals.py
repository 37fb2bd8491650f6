"""Table of bad inputs to the shared commands (train, sample, evaluate, show-config): each is refused with exit
code 2 and one line naming the argument, key or file (issue 11, item 6; the domains' own tables are in
tests/<domain>/test_<domain>_refusals.py)."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from reed.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A finished 2-step run (``run``), its data and a few stray files to point arguments at."""
    d = tmp_path_factory.mktemp("refusals")
    rng = np.random.default_rng(0)
    np.savez(d / "d.npz", images=rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8), labels=np.arange(16) % 4)
    base = ["image.data.name=npz", f"image.data.path={d / 'd.npz'}", "targets=[]", "objective.method=sit",
            "image.model.preset=SiT-T/4", "train.batch_size=8", "train.progress=false", "train.sample_every=0",
            "train.checkpoint_every=2", "train.steps=2", f"train.cache_dir={d / 'cache'}"]
    assert main(["train", str(DEMO), *base, "--out", str(d / "run")]) == 0
    (d / "file.txt").write_text("not a directory")
    (d / "bad.yaml").write_text("train: [unclosed\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    return {"d": d, "base": base, "run": d / "run"}


def _damaged_copy(env, name: str, mutate) -> Path:
    """A copy of the run whose newest checkpoint ``mutate(ckpt_dir)`` damaged."""
    run = env["d"] / name
    if not run.exists():
        shutil.copytree(env["run"], run)
        mutate(run / "checkpoints" / "step_0000002")
    return run


def _flip(ck: Path) -> None:
    p = ck / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[-5] ^= 0x55
    p.write_bytes(bytes(b))


def _state_list(ck: Path) -> None:
    (ck / "checksums.json").unlink()
    (ck / "state.json").write_text("[]")


# (id, argv builder: env -> argv, what the error line must name: env -> list of strings)
CASES = [
    ("config-missing", lambda e: ["train", "nope.yaml"], lambda e: ["nope.yaml"]),
    ("config-invalid-yaml", lambda e: ["show-config", e["d"] / "bad.yaml"], lambda e: ["bad.yaml", "YAML"]),
    ("config-not-a-mapping", lambda e: ["show-config", e["d"] / "list.yaml"], lambda e: ["list.yaml", "mapping"]),
    ("unknown-key", lambda e: ["show-config", DEMO, "train.stepz=3"], lambda e: ["train.stepz"]),
    ("override-without-equals", lambda e: ["show-config", DEMO, "train.steps"], lambda e: ["train.steps"]),
    ("wrong-type", lambda e: ["show-config", DEMO, "train.steps=many"], lambda e: ["train.steps", "integer"]),
    ("log-every-zero", lambda e: ["show-config", DEMO, "train.log_every=0"], lambda e: ["train.log_every"]),
    ("negative-lr", lambda e: ["show-config", DEMO, "train.lr=-1e-4"], lambda e: ["train.lr", "positive"]),
    ("nan-lr", lambda e: ["show-config", DEMO, "train.lr=.nan"], lambda e: ["train.lr"]),
    ("negative-weight-decay", lambda e: ["show-config", DEMO, "train.weight_decay=-1"],
     lambda e: ["train.weight_decay"]),
    ("unknown-log-with", lambda e: ["show-config", DEMO, "train.log_with=[tensorbored]"],
     lambda e: ["train.log_with", "tensorbored"]),
    ("unknown-mixed-precision", lambda e: ["show-config", DEMO, "train.mixed_precision=fp8"],
     lambda e: ["train.mixed_precision", "fp8"]),
    ("bad-betas", lambda e: ["show-config", DEMO, "train.betas=[0.9, 1.5]"], lambda e: ["train.betas"]),
    ("warmup-from-above-one", lambda e: ["show-config", DEMO, "train.warmup_from=2"], lambda e: ["train.warmup_from"]),
    ("unknown-optimizer", lambda e: ["show-config", DEMO, "train.optimizer=sgd"], lambda e: ["train.optimizer"]),
    ("haste-without-stop", lambda e: ["show-config", DEMO, "objective.method=haste"],
     lambda e: ["objective.method=haste", "objective.curriculum.align_stop"]),
    ("negative-align-stop", lambda e: ["show-config", DEMO, "objective.curriculum.align_stop=-1"],
     lambda e: ["objective.curriculum.align_stop"]),
    ("unknown-method", lambda e: ["show-config", DEMO, "objective.method=rep"], lambda e: ["objective.method", "rep"]),
    ("even-conv-kernel", lambda e: ["show-config", DEMO, "targets.0.projector_kernel=2"],
     lambda e: ["targets.0.projector_kernel", "odd"]),
    ("conv-projector-on-pooled", lambda e: ["show-config", DEMO, "targets.1.projector=conv"],
     lambda e: ["targets.1.projector", "token grid", "pooled"]),
    ("spatial-norm-on-pooled", lambda e: ["show-config", DEMO, "targets.1.target_norm=spatial"],
     lambda e: ["targets.1.target_norm", "pooled"]),
    ("dispersive-tau-zero", lambda e: ["show-config", DEMO, "objective.dispersive.tau=0"],
     lambda e: ["objective.dispersive.tau"]),
    ("dispersive-negative-coeff", lambda e: ["show-config", DEMO, "objective.dispersive.coeff=-0.1"],
     lambda e: ["objective.dispersive.coeff"]),
    ("self-align-student-not-below-teacher", lambda e: ["show-config", DEMO, "objective.self_align.student_depth=8"],
     lambda e: ["objective.self_align.student_depth", "teacher_depth"]),
    ("self-align-t-max", lambda e: ["show-config", DEMO, "objective.self_align.t_max=1.5"],
     lambda e: ["objective.self_align.t_max"]),
    ("out-is-a-file", lambda e: ["train", DEMO, *e["base"], "--out", e["d"] / "file.txt"],
     lambda e: [str(e["d"] / "file.txt"), "is a file"]),
    ("out-holds-a-run", lambda e: ["train", DEMO, *e["base"], "--out", e["run"]],
     lambda e: [str(e["run"]), "already holds a run", "--resume", "--overwrite"]),
    ("resume-fewer-steps", lambda e: ["train", DEMO, *e["base"][:-2], "train.steps=1", f"train.cache_dir={e['d']}",
                                      "--out", e["run"], "--resume"], lambda e: ["train.steps=1", "step_0000002"]),
    ("resume-changed-model", lambda e: ["train", DEMO, *e["base"], "image.model.preset=SiT-T/2", "--out", e["run"],
                                        "--resume"], lambda e: ["image.model.preset"]),
    ("resume-flipped-weights", lambda e: ["train", DEMO, *e["base"][:-2], "train.steps=4", "--out",
                                          _damaged_copy(e, "flipped", _flip), "--resume"],
     lambda e: ["model.safetensors", "sha256"]),
    ("resume-state-json-wrong-shape", lambda e: ["train", DEMO, *e["base"][:-2], "train.steps=4", "--out",
                                                 _damaged_copy(e, "state_list", _state_list), "--resume"],
     lambda e: ["state.json", "'step'"]),
    ("sample-num-zero", lambda e: ["sample", e["run"], "--num", "0"], lambda e: ["--num", "0"]),
    ("sample-num-negative", lambda e: ["sample", e["run"], "--num", "-5"], lambda e: ["--num", "-5"]),
    ("sample-steps-zero", lambda e: ["sample", e["run"], "--steps", "0"], lambda e: ["--steps", "0"]),
    ("sample-batch-size-zero", lambda e: ["sample", e["run"], "--batch-size", "0"], lambda e: ["--batch-size"]),
    ("sample-out-is-a-directory", lambda e: ["sample", e["run"], "--out", e["d"]], lambda e: ["--out", "directory"]),
    ("sample-out-under-a-file", lambda e: ["sample", e["run"], "--out", e["d"] / "file.txt" / "s.npz"],
     lambda e: ["file.txt", "is a file"]),
    ("sample-missing-run", lambda e: ["sample", e["d"] / "no_run"], lambda e: ["no_run"]),
    ("evaluate-batch-size-zero", lambda e: ["evaluate", e["d"] / "d.npz", "--batch-size", "0"],
     lambda e: ["--batch-size"]),
    ("evaluate-out-is-a-directory", lambda e: ["evaluate", e["d"] / "d.npz", "--out", e["d"]],
     lambda e: ["--out", "directory"]),
]


@pytest.mark.parametrize("argv, names", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_refused_with_one_line(env, refuses, argv, names):
    refuses(argv(env), *names(env))


def test_yaml_no_is_accepted_for_mixed_precision(tmp_path):
    from reed.config import load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(DEMO.read_text().replace("train:\n", "train:\n  mixed_precision: no\n", 1))
    assert load_config(cfg_file).train.mixed_precision == "no"
    assert load_config(DEMO, ["train.mixed_precision=no"]).train.mixed_precision == "no"
