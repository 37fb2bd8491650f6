"""End-to-end: REED training on the embedded digits with both real targets, resume, NaN stop, sampling CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reed.cli import main
from reed.config import load_config
from reed.errors import NonFiniteLossError
from reed.processes.flow import FlowProcess
from reed.train import train

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A cache dir holding a quickly fitted digits encoder, shared by the tests of this module."""
    d = tmp_path_factory.mktemp("e2e")
    enc = d / "encoder"
    rc = main(["fit-encoder", str(DEMO), f"targets.0.path={enc}", "image.fit.steps=40", "train.progress=false"])
    assert rc == 0 and (enc / "encoder.safetensors").is_file()
    return d


def small(workdir, *extra):
    """Demo config shrunk for tests (fast, still both targets)."""
    return [f"targets.0.path={workdir / 'encoder'}", f"train.cache_dir={workdir / 'cache'}", "train.batch_size=64",
            "train.progress=false", "train.sample_every=0", "train.num_preview=10", "image.sample.steps=5",
            "objective.curriculum.gen_warmup=10", "train.log_every=1", *extra]


def read_metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_reed_training_runs_end_to_end_and_loss_falls(workdir):
    run = workdir / "run"
    cfg = load_config(DEMO, small(workdir, "train.steps=80", "train.checkpoint_every=40"))
    res = train(cfg, run)
    assert res.step == 80
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(80))
    for key in ("loss", "loss_gen", "loss_align", "w_gen", "w_align", "grad_norm", "align/ssl", "align/caption"):
        assert key in recs[0], key
    assert recs[0]["w_gen"] == 0.0 and recs[5]["w_gen"] == pytest.approx(0.5) and recs[-1]["w_gen"] == 1.0
    first = np.mean([r["loss_gen"] for r in recs[:10]])
    last = np.mean([r["loss_gen"] for r in recs[-10:]])
    assert last < 0.8 * first, (first, last)
    # the alignment terms improve (negative cosine goes down)
    assert np.mean([r["align/ssl"] for r in recs[-10:]]) < np.mean([r["align/ssl"] for r in recs[:10]]) - 0.05
    assert np.mean([r["align/caption"] for r in recs[-10:]]) < np.mean([r["align/caption"] for r in recs[:10]])
    # run directory layout
    assert (run / "config.yaml").is_file() and (run / "loss.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_0000040", "step_0000080"]
    ck = run / "checkpoints" / "step_0000080"
    assert {p.name for p in ck.iterdir()} >= {"model.safetensors", "ema.safetensors", "optimizer.safetensors",
                                              "state.json", "config.yaml"}
    assert "caption" in (ck / "config.yaml").read_text()
    model = load_file(str(ck / "model.safetensors"))
    assert model["projectors.caption.net.4.weight"].shape == (384, 256)  # MiniLM is 384-d
    assert model["projectors.ssl.net.4.weight"].shape == (64, 256)
    assert (run / "samples" / "step_0000080.png").is_file()
    # CLI sampling from the run directory: ADM layout uint8 (N,H,W,C) + PNG grid + settings record
    out = workdir / "s.npz"
    assert main(["sample", str(run), "--num", "12", "--out", str(out), "--steps", "4"]) == 0
    arr = np.load(out)
    assert arr["arr_0"].shape == (12, 8, 8, 1) and arr["arr_0"].dtype == np.uint8
    assert arr["arr_1"].tolist() == [i % 10 for i in range(12)]
    assert out.with_suffix(".png").is_file()
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["sampler"] == "euler" and rec["steps"] == 4 and rec["weights"] == "ema"
    assert main(["sample", str(run), "--num", "3", "--out", str(workdir / "sde.npz"), "--sampler", "sde",
                 "--steps", "4", "--cfg-scale", "2"]) == 0
    assert np.load(workdir / "sde.npz")["arr_0"].shape == (3, 8, 8, 1)


def test_resume_reproduces_uninterrupted_run(workdir):
    """Interrupted and resumed with the batches prepared by 2 data-loader workers (reed.loader): the curve and
    the weights of the uninterrupted run on the main thread, exactly."""
    args = small(workdir, "train.steps=16", "train.checkpoint_every=8", "train.lr=0.002")
    cfg = load_config(DEMO, args)
    full, part = workdir / "full", workdir / "part"
    train(cfg, full)
    cfg = load_config(DEMO, [*args, "train.workers=2", "train.prefetch=3"])
    train(cfg, part, stop_at=11)  # "interrupted" after step 11; the step-8 checkpoint survives
    assert (part / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    assert [r["step"] for r in read_metrics(part)] == list(range(11))
    train(cfg, part, resume=True)
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(16))
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_gen", "loss_align", "grad_norm", "align/ssl", "align/caption"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    wa = load_file(str(full / "checkpoints" / "step_0000016" / "ema.safetensors"))
    wb = load_file(str(part / "checkpoints" / "step_0000016" / "ema.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_mismatched_config_is_refused(workdir, capsys):
    run = workdir / "full"
    rc = main(["train", str(DEMO), *small(workdir, "train.steps=20", "image.model.preset=SiT-T/4"), "--out", str(run),
               "--resume"])
    assert rc == 2
    assert "model.preset" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_checkpoint(workdir, monkeypatch):
    real = FlowProcess.loss
    calls = {"n": 0}

    def flaky(pred, target):
        calls["n"] += 1
        out = real(pred, target)
        return out * float("nan") if calls["n"] > 12 else out

    monkeypatch.setattr(FlowProcess, "loss", staticmethod(flaky))
    run = workdir / "nan"
    cfg = load_config(DEMO, small(workdir, "train.steps=30", "train.checkpoint_every=5"))
    with pytest.raises(NonFiniteLossError, match=r"at step 12.*step_0000010"):
        train(cfg, run)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    assert load_file(str(run / "checkpoints" / "step_0000010" / "model.safetensors"))
