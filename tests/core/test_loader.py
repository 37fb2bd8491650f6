"""reed.loader: step-indexed micro-batches from data-loader workers, in order, equal to the main thread's."""

from __future__ import annotations

import os

import pytest
import torch

from reed.errors import DataError
from reed.loader import default_workers, step_batches, to_device
from reed.molecule.batch import MoleculeBatch


def _source(step: int) -> list:
    """A pure function of the step, as a domain's host_batches: two micro-batches and the worker's pid."""
    g = torch.Generator().manual_seed(1000 + step)
    return [{"x": torch.randn(3, generator=g), "step": torch.tensor(step), "pid": torch.tensor(os.getpid())}
            for _ in range(2)]


def test_workers_serve_the_main_threads_batches_in_step_order():
    plain = list(step_batches(_source, 5, 14))
    served = list(step_batches(_source, 5, 14, workers=2, prefetch=3))
    assert len(served) == 9
    assert [int(b[0]["step"]) for b in served] == list(range(5, 14))
    for a, b in zip(plain, served):
        assert torch.equal(a[0]["x"], b[0]["x"]) and torch.equal(a[1]["x"], b[1]["x"])
    pids = {int(b[0]["pid"]) for b in served}
    assert os.getpid() not in pids and len(pids) == 2  # prepared in two worker processes
    assert list(step_batches(_source, 3, 3, workers=2)) == []


def _bad_source(step: int) -> list:
    if step == 2:
        raise DataError("target 'ssl': store /x has NaN/inf rows in this batch")
    return [torch.zeros(1)]


def test_a_reed_error_in_a_worker_is_raised_as_itself_without_the_workers_traceback():
    with pytest.raises(DataError) as info:
        list(step_batches(_bad_source, 0, 4, workers=2))
    assert str(info.value) == "target 'ssl': store /x has NaN/inf rows in this batch"


def test_to_device_moves_nested_tensors_and_batch_objects():
    long = torch.long
    mb = MoleculeBatch(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=long), torch.zeros(1, 2, 2, dtype=long),
                       torch.zeros(1, 2, dtype=long), torch.ones(1, 2, dtype=torch.bool))
    out = to_device((mb, {"z": torch.ones(2)}, [torch.ones(1)], "name"), torch.device("cpu"))
    assert isinstance(out, tuple) and isinstance(out[0], MoleculeBatch) and out[3] == "name"
    assert torch.equal(out[1]["z"], torch.ones(2)) and out[0].x.shape == (1, 2, 3)


def test_default_workers_are_none_on_cpu_and_share_the_cores_on_cuda(monkeypatch):
    assert default_workers(torch.device("cpu")) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert default_workers(torch.device("cuda")) == 1  # one core kept for the process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers(torch.device("cuda")) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on 16 cores: 2 each
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_workers(torch.device("cuda")) == 1


def test_workers_leave_the_global_rng_alone():
    """The model's dropout draws from the global RNG: starting the workers must not move it."""
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    assert len(list(step_batches(_source, 0, 4, workers=2))) == 4
    assert torch.equal(torch.rand(3), want)
