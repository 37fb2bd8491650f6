"""Pictures people would rather look at: sample grids and loss curves (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, nrow: int | None = None, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile uint8 images (N,H,W,C) into one (H', W', C) grid with ``nrow`` images per row, upscaled by ``scale``."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return grid


def save_image_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, min_cell: int = 48) -> Path:
    """Write a PNG grid of uint8 images (N,H,W,C); tiny images are upscaled (nearest) to at least ``min_cell`` px."""
    h = images.shape[1]
    scale = max(1, math.ceil(min_cell / h))
    grid = image_grid(images, nrow=nrow, scale=scale)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if mode == "L" else grid[..., :3], mode=mode).save(path)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` file (one JSON object per line)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _smooth(y: np.ndarray, frac: float = 0.05) -> np.ndarray:
    if len(y) < 5:
        return y
    k = max(1, int(len(y) * frac))
    kernel = np.ones(k) / k
    return np.convolve(np.pad(y, (k // 2, k - 1 - k // 2), mode="edge"), kernel, mode="valid")


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path | None:
    """Loss breakdown (total, generative, alignment per target) and curriculum weights vs step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    if not recs:
        return None
    steps = np.array([r["step"] for r in recs])
    fig, (ax, axw) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, style in (("loss", "-"), ("loss_gen", "-")):
        y = np.array([r[key] for r in recs], dtype=float)
        ax.plot(steps, _smooth(y), style, label=key)
    ax.set_ylabel("generative / total loss")
    align_keys = sorted({k for r in recs for k in r if k.startswith("align/")})
    if align_keys:
        ax2 = ax.twinx()
        for i, k in enumerate(align_keys):
            ax2.plot(steps, _smooth(np.array([r.get(k, np.nan) for r in recs], dtype=float)), "--", label=k,
                     color=f"C{i + 2}")
        ax2.set_ylabel("alignment (neg. cosine)")
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "training loss")
    for key in ("w_gen", "w_align"):
        axw.plot(steps, [r[key] for r in recs], label=key)
    axw.set_ylabel("weight")
    axw.set_xlabel("step")
    axw.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
