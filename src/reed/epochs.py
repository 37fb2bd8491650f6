"""Step -> batch bookkeeping for data in precomputed, variable-size batches (protein token budgets, molecule atom
budgets): an epoch visits every batch once, in an order that is a pure function of (seed, epoch), so training
resumes exactly."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import torch

from reed.config import Config


class EpochBatches:
    """``batches`` (lists of example indices) consumed ``world x grad_accum`` per optimizer step."""

    def __init__(self, batches: list[list[int]], *, seed: int, world: int, grad_accum: int):
        self.batches = batches
        self.seed = seed
        self.world = world
        self.per_step = world * grad_accum
        self.grad_accum = grad_accum
        self.steps_per_epoch = max(math.ceil(len(batches) / self.per_step), 1)

    def resolve_steps(self, cfg: Config) -> Config:
        """``train.steps = train.epochs x steps per epoch`` when ``train.epochs`` > 0."""
        tc = cfg.train
        return replace(cfg, train=replace(tc, steps=tc.epochs * self.steps_per_epoch)) if tc.epochs > 0 else cfg

    def order(self, epoch: int) -> torch.Tensor:
        """Permutation of the batches for ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.batches), generator=g)

    def indices(self, step: int, rank: int) -> Iterator[list[int]]:
        """The ``grad_accum`` batches (example indices) of process ``rank`` at ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        for k in range(self.grad_accum):
            pos = (within * self.per_step + k * self.world + rank) % len(self.batches)
            yield self.batches[int(order[pos])]
