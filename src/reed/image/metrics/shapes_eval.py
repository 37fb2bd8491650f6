"""The evaluator of the ``shapes`` world (:mod:`reed.image.shapes`): FD and attribute accuracy in a network that
knows the world, trained with labels and attributes on the world's own ``evaluator`` range and never used as an
alignment target.

A CNN (the in-domain classifier's body, :class:`~reed.image.metrics.indomain.DomainClassifier`) with one head per
attribute: class (10), shape (5), count (2), first object's colour (6) and size (2), relation (3), background (2).
Samples are scored by

* ``fd``: Fréchet distance of its penultimate features against the ``reference`` range (held-out real images);
* ``accuracy``: the class head agrees with the requested label;
* ``attribute_accuracy``: the shape and count heads agree with what the label implies;
* ``malformed``: the fraction of samples whose shape or count the network cannot read (max probability < 0.5);
* ``attribute_tv``: for what the label does not fix (colour, size, relation, background), the total-variation
  distance between the predicted attribute distribution of the samples and of the reference images (0: the
  generator draws them as the world does).

The floor of each number is what real held-out images score (:meth:`ShapesEvaluator.fd_floor`, ``real``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from reed.errors import DataError
from reed.image.metrics.frechet import feature_stats, frechet_distance
from reed.image.metrics.indomain import EVALUATOR_SEED, DomainClassifier, check_labels
from reed.io import atomic_save_safetensors, atomic_write_text

HEADS = {"class": 10, "shape": 5, "count": 2, "colour": 6, "size": 2, "relation": 3, "background": 2}
FREE_ATTRIBUTES = ("colour", "size", "relation", "background")  # not implied by the class label
TRAIN_SIZE, HELD_OUT, REF_SIZE = 12000, 2000, 5000
VERSION = 1


def head_targets(attrs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, torch.Tensor]:
    """The evaluator's training targets (N,) int64 per head from :func:`reed.image.shapes.draw_attributes`."""
    return {"class": torch.from_numpy(labels), "shape": torch.from_numpy(attrs["shape"]),
            "count": torch.from_numpy(attrs["count"] - 1), "colour": torch.from_numpy(attrs["colour"][:, 0]),
            "size": torch.from_numpy(attrs["size"][:, 0]), "relation": torch.from_numpy(attrs["relation"]),
            "background": torch.from_numpy(attrs["background"])}


class AttributeNet(DomainClassifier):
    """:class:`DomainClassifier` with a head per attribute; ``heads(x)`` -> {name: logits (B, K)}."""

    def __init__(self, in_channels: int = 3, width: int = 32, feat_dim: int = 128):
        super().__init__(in_channels, HEADS["class"], width=width, feat_dim=feat_dim)
        self.config = dict(in_channels=in_channels, width=width, feat_dim=feat_dim)
        # a deeper body than the digits classifier's: shapes and relations need a receptive field of the image
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, stride=2), nn.GELU(),
            nn.Flatten(), nn.LazyLinear(feat_dim), nn.GELU(),
        )
        self.attr_heads = nn.ModuleDict({k: nn.Linear(feat_dim, v) for k, v in HEADS.items() if k != "class"})

    def heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads_of_features(self.features(x))

    def heads_of_features(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: logits (B, K)} of features ``f`` (B, feat_dim)."""
        return {"class": self.head(f), **{k: h(f) for k, h in self.attr_heads.items()}}


def _images(batch) -> torch.Tensor:
    return torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def fit_attribute_net(x: torch.Tensor, y: dict[str, torch.Tensor], *, steps: int = 2000, batch_size: int = 256,
                      lr: float = 2e-3, seed: int = EVALUATOR_SEED) -> AttributeNet:
    """Train on images ``x`` (N,3,H,W) in [-1,1] with the sum of the heads' cross-entropies; eval mode, frozen."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = AttributeNet(x.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        out = net.heads(x[idx])
        loss = sum(F.cross_entropy(out[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


class ShapesEvaluator:
    """Scores samples (N,3,H,W) in [-1,1] with their labels (N,) against the world's reference images."""

    def __init__(self, net: AttributeNet, seed: int, resolution: int, held_out_accuracy: dict[str, float]):
        from reed.image.shapes import render, world_indices

        self.net, self.seed, self.resolution = net, seed, resolution
        self.held_out_accuracy = held_out_accuracy
        ref = _images(render(world_indices("reference", REF_SIZE), seed=seed, resolution=resolution))
        feats, self._ref_probs = self._features_and_probs(ref)
        self.ref_mu, self.ref_sigma = feature_stats(feats)

    @torch.no_grad()
    def _features_and_probs(self, x: torch.Tensor, bs: int = 1000) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        feats, probs = [], {k: [] for k in HEADS}
        for i in range(0, len(x), bs):
            f = self.net.features(x[i : i + bs].float())
            feats.append(f)
            for k, v in self.net.heads_of_features(f).items():
                probs[k].append(v.softmax(-1))
        return torch.cat(feats).numpy(), {k: torch.cat(v) for k, v in probs.items()}

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor) -> dict:
        """``fd``, ``accuracy``, ``attribute_accuracy`` (shape, count), ``malformed``, ``attribute_tv``."""
        if len(samples) < 2:
            raise DataError(f"shapes scoring needs at least 2 samples (FD fits a covariance), got {len(samples)}")
        res = self.resolution
        if tuple(samples.shape[1:]) != (3, res, res):
            raise DataError(f"shapes samples must be (N, 3, {res}, {res}), got {tuple(samples.shape)}")
        labels = torch.as_tensor(labels).long().cpu()
        check_labels(labels, len(samples), HEADS["class"], "sample labels")
        feats, p = self._features_and_probs(samples.cpu())
        mu, sigma = feature_stats(feats)
        shape, count = labels // 2, labels % 2
        conf = torch.minimum(p["shape"].max(-1).values, p["count"].max(-1).values)
        tv = {k: 0.5 * float((p[k].mean(0) - self._ref_probs[k].mean(0)).abs().sum()) for k in FREE_ATTRIBUTES}
        return {"fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
                "accuracy": float((p["class"].argmax(-1) == labels).float().mean()),
                "attribute_accuracy": {"shape": float((p["shape"].argmax(-1) == shape).float().mean()),
                                       "count": float((p["count"].argmax(-1) == count).float().mean())},
                "malformed": float((conf < 0.5).float().mean()), "attribute_tv": tv,
                "num_samples": int(len(samples))}

    def real(self, num: int) -> dict:
        """What ``num`` held-out real images (the reference range after the reference set) score: the floor."""
        from reed.image.shapes import render, world_indices

        b = render(world_indices("reference", num, start=REF_SIZE), seed=self.seed, resolution=self.resolution)
        return self(_images(b), torch.from_numpy(b.labels))

    def fd_floor(self, num: int) -> float:
        """FD of ``num`` held-out real images against the reference set (what a perfect generator scores)."""
        return self.real(num)["fd"]


def shapes_evaluator(data, cache_dir: str | Path = ".cache/reed", *, train_size: int = TRAIN_SIZE,
                     steps: int = 2000, batch_size: int = 256) -> ShapesEvaluator:
    """The (cached) evaluator of the world of ``data`` (an ``image.data`` config with ``name: shapes``), trained on
    ``train_size`` images of the world's evaluator range and checked on the next :data:`HELD_OUT`."""
    from reed.image.shapes import render, world_indices

    seed, res = int(data.seed), int(data.resolution)
    tag = f"shapes|{seed}|{res}|{train_size}|{steps}|{batch_size}|{EVALUATOR_SEED}|v{VERSION}"
    key = hashlib.sha256(tag.encode()).hexdigest()[:16]
    d = Path(cache_dir) / "evaluators" / f"shapes-{key}"
    meta_path, weights = d / "evaluator.json", d / "evaluator.safetensors"
    if meta_path.is_file() and weights.is_file():
        meta = json.loads(meta_path.read_text())
        net = AttributeNet(**meta["config"])
        net.load_state_dict(load_file(str(weights)))
        return ShapesEvaluator(net.eval().requires_grad_(False), seed, res, meta["held_out_accuracy"])
    b = render(world_indices("evaluator", train_size + HELD_OUT), seed=seed, resolution=res)
    x, y = _images(b), head_targets(b.attributes, b.labels)
    net = fit_attribute_net(x[:train_size], {k: v[:train_size] for k, v in y.items()}, steps=steps,
                            batch_size=batch_size)
    with torch.no_grad():
        out = net.heads(x[train_size:])
    acc = {k: float((out[k].argmax(-1) == y[k][train_size:]).float().mean()) for k in HEADS}
    d.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(weights, {k: v.contiguous() for k, v in net.state_dict().items()})
    meta = {"config": net.config, "held_out_accuracy": acc, "seed": seed, "resolution": res,
            "train_size": train_size, "steps": steps}
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    return ShapesEvaluator(net, seed, res, acc)
