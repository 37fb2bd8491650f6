"""EMA arithmetic, batch order, checkpoint round trip of optimizer/RNG state, accumulation and bf16 paths."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reed.checkpoint import load_optimizer_state, load_weights, read_state, restore_rng, save_checkpoint
from reed.config import load_config
from reed.ema import EMA
from reed.image.data import batch_indices
from reed.train import train

ROOT = Path(__file__).resolve().parents[2]


def test_ema_update_hand_computed():
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m)
    assert ema.model.weight.item() == pytest.approx(0.9 * 1 + 0.1 * 3)
    ema.update(m)
    assert ema.model.weight.item() == pytest.approx(0.9 * 1.2 + 0.1 * 3)
    assert not ema.model.training and not ema.model.weight.requires_grad


def test_batch_indices_cover_each_epoch_once():
    n, b = 50, 8
    per_epoch = n // b
    seen = torch.cat([batch_indices(s, n, b, seed=3) for s in range(per_epoch)])
    assert len(set(seen.tolist())) == per_epoch * b  # no repeats within an epoch
    assert torch.equal(batch_indices(7, n, b, 3), batch_indices(7, n, b, 3))  # pure function of the step
    assert not torch.equal(batch_indices(per_epoch, n, b, 3), batch_indices(0, n, b, 3))  # reshuffled


def test_optimizer_and_rng_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    ck = save_checkpoint(tmp_path, 1, model=model.state_dict(), ema=model.state_dict(), optimizer=opt.state_dict(),
                         scheduler={"last_epoch": 1}, config_yaml="seed: 0\n")
    expect = (torch.rand(1).item(), np.random.rand(), random.random())
    state = read_state(ck)
    opt_state, rng = load_optimizer_state(ck, state)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(opt_state)
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    restore_rng(rng, state["rng"])
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == expect
    assert state["scheduler"] == {"last_epoch": 1} and set(load_weights(ck, "model")) == {"weight", "bias"}


@pytest.mark.parametrize("extra", [["train.grad_accum=2"], ["train.mixed_precision=bf16"]])
def test_accumulation_and_bf16_train(tmp_path, extra):
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 255, (64, 8, 8), dtype=np.uint8), labels=np.arange(64) % 3)
    np.save(tmp_path / "z.npy", rng.standard_normal((64, 16, 8)).astype(np.float32))
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        "image.data.name=npz", f"image.data.path={data}", "train.steps=6", "train.batch_size=16",
            "train.progress=false",
        "train.log_every=1", f"train.cache_dir={tmp_path / 'c'}",
        f"targets=[{{name: f, source: file, path: {tmp_path / 'z.npy'}, kind: tokens, depth: 1, projector_dim: 8}}]",
        *extra])
    res = train(cfg, tmp_path / "run")
    assert res.step == 6
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_resuming_switches_the_optimizer_implementation_and_moves_its_step_counters():
    """A checkpoint's optimizer state carries its implementation: resumed with train.fused_optimizer (as on a GPU)
    the groups become fused with float32 step counters on the parameters' device, and back unfused they return to
    the CPU; either way the next update equals the unfused one to rounding (CPU has a fused AdamW too)."""
    from types import SimpleNamespace

    from reed.train import apply_new_hyperparameters, build_optimizer

    tc = SimpleNamespace(optimizer="adamw", lr=1e-2, betas=[0.9, 0.999], weight_decay=0.01, amsgrad=False,
                         lr_warmup=0, warmup_from=0.0)
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    g = [torch.randn(5, 3) for _ in range(3)]

    def run(fused_after: bool) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        p = nn.Parameter(w0.clone())
        opt = build_optimizer([p], tc)
        for k in range(2):
            p.grad = g[k].clone()
            opt.step()
        state = opt.state_dict()
        opt2 = build_optimizer([p], tc, fused=fused_after)
        opt2.load_state_dict(state)
        sched = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
        apply_new_hyperparameters(opt2, sched, tc, fused=fused_after)
        p.grad = g[2].clone()
        opt2.step()
        return p.detach().clone(), opt2

    plain, opt_plain = run(False)
    fused, opt_fused = run(True)
    assert opt_fused.param_groups[0]["fused"] is True and opt_plain.param_groups[0]["fused"] is None
    step = next(iter(opt_fused.state.values()))["step"]
    assert step.dtype == torch.float32 and float(step) == 3.0
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
