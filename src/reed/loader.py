"""Micro-batches prepared ahead by ``torch.utils.data`` workers, with pinned memory, without giving up exact resume.

A domain splits a micro-batch into two halves (:class:`reed.domains.Domain`):

* ``host_batches(step, rank, world)`` -> the ``grad_accum`` micro-batches of process ``rank`` at ``step`` as CPU
  objects (tensors, or objects with ``to`` and ``pin_memory`` methods): reading, decoding and collating. It is a
  pure function of ``(seed, step, rank)``, so it can run in any worker, in any order, and a resumed run reads
  exactly what the uninterrupted one read.
* ``device_batch(host, device, generator)`` -> the batch the loss sees, on the main process: the copy to the
  device and whatever needs the device or the step's generator (an online encoder, a VAE posterior draw).

:func:`step_batches` serves the host halves of steps ``start .. end - 1`` in order, either from the main thread
(``workers=0``) or from a :class:`~torch.utils.data.DataLoader` whose dataset is indexed by the step, so worker
``w`` prepares steps ``start + w, start + w + workers, ...`` up to ``prefetch`` ahead each while the device trains.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from reed.errors import ReedError

__all__ = ["step_batches", "to_device", "default_workers", "StepSource"]

#: ``step -> [host micro-batch, ...]`` (the ``grad_accum`` micro-batches of one process at one step)
StepSource = Callable[[int], list]


class _Failure:
    """A reed error raised in a worker, carried to the main process to be raised there as itself (a DataLoader
    would re-raise it with the worker's traceback pasted into the message)."""

    def __init__(self, error: ReedError):
        self.kind, self.message = type(error), str(error)

    def reraise(self) -> None:
        try:
            err = self.kind(self.message)
        except TypeError:  # a subclass with another constructor
            err = ReedError(self.message)
        raise err from None


class _Steps(Dataset):
    """Item ``i`` = the host micro-batches of step ``start + i``."""

    def __init__(self, source: StepSource, start: int, end: int):
        self.source, self.start, self.end = source, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> list | _Failure:
        try:
            return self.source(self.start + i)
        except ReedError as e:  # bad data (a NaN row, a corrupt shard): one clear error in the main process
            return _Failure(e)


def _as_is(item: list) -> list:
    """``collate_fn`` of a step-indexed loader: the item is already the step's micro-batches."""
    return item


def default_workers(device: torch.device) -> int:
    """``train.workers: null``: on CUDA 4 workers per process, fewer where the cores this process may use (its CPU
    affinity, divided among the node's processes, ``LOCAL_WORLD_SIZE``) leave less, keeping one for the process
    itself; none on CPU, where the workers would take the cores the training step runs on."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(4, per_process - 1))


def step_batches(source: StepSource, start: int, end: int, *, workers: int = 0, prefetch: int = 2,
                 pin_memory: bool = False) -> Iterator[list]:
    """The host micro-batches of steps ``start .. end - 1``, in step order.

    ``workers`` > 0 prepares them in that many worker processes (``prefetch`` steps ahead each, pinned when
    ``pin_memory``); with 0 the main thread calls ``source(step)`` when the step begins. Workers are forked where
    the platform offers it (Linux, macOS), so a domain's data need not be pickled; they never touch the device.
    """
    if workers <= 0:
        for step in range(start, end):
            yield source(step)
        return
    if end <= start:
        return
    ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    loader = DataLoader(_Steps(source, start, end), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_as_is, pin_memory=pin_memory, prefetch_factor=prefetch,
                        multiprocessing_context=ctx, persistent_workers=False,
                        # its own generator: the workers' base seed must not draw from the global RNG, which the
                        # model's dropout uses (with workers and without, the step sees the same dropout masks)
                        generator=torch.Generator().manual_seed(start))
    for item in loader:
        if isinstance(item, _Failure):
            item.reraise()
        yield item


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor moved to ``device`` (non-blocking: the copy from pinned memory overlaps compute).

    Tensors, objects with a ``to(device)`` method (e.g. padded batch dataclasses), and dicts, lists and tuples of
    them; anything else is returned as is.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if hasattr(obj, "to"):
        return obj.to(device)
    return obj
