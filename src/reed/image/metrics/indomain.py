"""In-domain evaluator for data sets where the standard networks (Inception, DINOv2) are not available.

A small CNN classifier is trained (supervised, its own seed, never used as an alignment target) on the training
set. Generated samples are then scored by
  * ``fd``: the Fréchet distance between classifier features (penultimate layer) of samples and of real data —
    an FID computed in a network that knows this domain;
  * ``accuracy``: how often the classifier recognises the class a class-conditional sample was asked for.
The classifier is cached per data set fingerprint, so every run and benchmark uses the same yardstick.
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
from reed.io import atomic_save_safetensors, atomic_write_text, read_npz

EVALUATOR_SEED = 12345  # fixed and distinct from training seeds


class DomainClassifier(nn.Module):
    """CNN for (B,C,H,W) images in [-1,1]: ``features`` (B,feat_dim) and ``forward`` logits (B,K)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feat_dim: int = 128):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feat_dim=feat_dim)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, feat_dim), nn.GELU(),
        )
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1 pixel (pad with the background value -1, then crop)."""
    b, _, h, w = x.shape
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
    return pad[:, :, dy : dy + h, dx : dx + w]


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int = 800,
                   batch_size: int = 128, lr: float = 2e-3, val_fraction: float = 0.2,
                   seed: int = EVALUATOR_SEED) -> tuple[DomainClassifier, float]:
    """Train on a random (1 - val_fraction) split; returns (classifier in eval mode, held-out accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = images.shape[0]
    perm = torch.randperm(n, generator=g)
    n_val = int(n * val_fraction)
    val, tr = perm[:n_val], perm[n_val:]
    clf = DomainClassifier(images.shape[1], num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (batch_size,), generator=g)]
        loss = F.cross_entropy(clf(_shift(images[idx], g)), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval().requires_grad_(False)
    with torch.no_grad():
        acc = (clf(images[val]).argmax(1) == labels[val]).float().mean().item() if n_val else float("nan")
    return clf, acc


class InDomainEvaluator:
    """Scores samples (N,C,H,W) in [-1,1] with labels (N,) against the real data it was built on."""

    def __init__(self, classifier: DomainClassifier, real_images: torch.Tensor, held_out_accuracy: float):
        self.classifier = classifier
        self.held_out_accuracy = held_out_accuracy
        self.real_mu, self.real_sigma = feature_stats(self.features(real_images))

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
        return torch.cat([self.classifier.features(x[i : i + batch_size].float())
                          for i in range(0, len(x), batch_size)]).numpy()

    @property
    def num_classes(self) -> int:
        return int(self.classifier.config["num_classes"])

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        if len(samples) < 2:
            raise DataError(f"in-domain scoring needs at least 2 samples (FD fits a covariance), got {len(samples)}")
        if labels is not None:
            check_labels(labels, len(samples), self.num_classes, "sample labels")
        feats = self.features(samples)
        mu, sigma = feature_stats(feats)
        out = {"fd": frechet_distance(mu, sigma, self.real_mu, self.real_sigma), "num_samples": int(len(samples))}
        if labels is not None:
            pred = torch.cat([self.classifier(samples[i : i + 1024].float()).argmax(1)
                              for i in range(0, len(samples), 1024)])
            out["accuracy"] = float((pred == labels.cpu()).float().mean())
        return out


def check_labels(labels: np.ndarray | torch.Tensor, n: int, num_classes: int, what: str) -> None:
    """Refuse class labels that are not (n,) integers in [0, num_classes) (the evaluator's classes)."""
    y = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what} must be (N,) integers with N={n} like the images, got {y.dtype} {y.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise DataError(f"{what} hold class {bad}, outside the evaluator's classes 0..{num_classes - 1} of the run's "
                        "data set")


def load_samples(path: str | Path, num_classes: int, shape: tuple[int, int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples of an ADM-layout ``.npz`` written by ``reed sample`` (``arr_0`` uint8 (N,H,W,C), optional ``arr_1``
    labels (N,)) as (N,C,H,W) float32 in [-1,1] and int64 labels (or None), for an evaluator of ``num_classes``
    classes on images of ``shape`` (C,H,W). Refuses (DataError naming the file) pickles / object arrays, non-uint8
    images, a shape other than ``shape``, fewer than 2 samples and labels outside [0, num_classes)."""
    from reed.image.metrics.adm import require_uint8

    d = read_npz(path, "sample batch (arr_0 uint8 (N,H,W,C), as `reed sample` writes)", required=("arr_0",))
    imgs, labels = d["arr_0"], d.get("arr_1")
    require_uint8(imgs.dtype, f"{path}:arr_0")
    if imgs.ndim != 4 or tuple(imgs.shape[3:] + imgs.shape[1:3]) != tuple(shape):
        c, h, w = shape
        raise DataError(f"{path}:arr_0 has shape {imgs.shape}; the run's images need (N, {h}, {w}, {c}) "
                        "(channels last)")
    if len(imgs) < 2:
        raise DataError(f"{path} holds {len(imgs)} sample(s); scoring needs at least 2 (FD fits a covariance)")
    if labels is not None:
        check_labels(labels, len(imgs), num_classes, f"{path}: labels arr_1")
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, (torch.from_numpy(labels.astype(np.int64)) if labels is not None else None)


def evaluator_for(ds, cache_dir: str | Path = ".cache/reed") -> InDomainEvaluator:
    """The (cached) in-domain evaluator of data set ``ds`` (needs ``pixels``, ``labels``, ``num_classes``)."""
    key = hashlib.sha256(f"{ds.fingerprint}|{EVALUATOR_SEED}|v1".encode()).hexdigest()[:16]
    d = Path(cache_dir) / "evaluators" / key
    images = ds.pixels(torch.arange(len(ds))).float()
    labels = torch.as_tensor(np.asarray(ds.labels), dtype=torch.long)
    meta_path, weights = d / "classifier.json", d / "classifier.safetensors"
    if meta_path.is_file() and weights.is_file():
        meta = json.loads(meta_path.read_text())
        clf = DomainClassifier(**meta["config"])
        clf.load_state_dict(load_file(str(weights)))
        clf.eval().requires_grad_(False)
        return InDomainEvaluator(clf, images, meta["held_out_accuracy"])
    clf, acc = fit_classifier(images, labels, ds.num_classes)
    d.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(weights, {k: v.contiguous() for k, v in clf.state_dict().items()})
    atomic_write_text(meta_path, json.dumps({"config": clf.config, "held_out_accuracy": acc, "data": ds.fingerprint}))
    return InDomainEvaluator(clf, images, acc)
