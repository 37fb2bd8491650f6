"""``shapes``: a procedural image world whose captions know more than its class labels (the yardstick's data).

Every image is a pure function of ``(seed, index)``: one or two flat objects on a plain background, with
compositional attributes

    shape       circle, square, triangle, ring, cross     (both objects of an image share it)
    count       1 or 2
    colour      red, green, blue, yellow, magenta, cyan   (per object)
    size        small or large                            (per object)
    relation    for two objects: the first is above or left of the second (in line with it, so the relation
                and which object is "first" can be read off the image)
    position    uniform where the relation allows
    background  dark or light

The class label (10 values) is ``2 * shape + (count - 1)``; the caption names everything else, e.g. *"a small
red triangle above a large blue triangle on a dark background."* — so a caption embedding carries what the label
does not (colours, sizes, relation, background), as a VLM caption does for ImageNet.

Disjoint roles: the world is indexed by integers, and each role uses its own range (:data:`ROLES`): the generator's
training set, the set an encoder is fitted on, the evaluator's training set and the FD reference set never share
an image. ``render(indices)`` draws any subset reproducibly; randomness is a counter-based hash of (seed, index,
field), so no generator state is carried between images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45), "green": (45, 175, 65), "blue": (55, 95, 235),
    "yellow": (235, 205, 40), "magenta": (205, 60, 200), "cyan": (40, 200, 215),
}  # fmt: skip
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"dark": (25, 25, 35), "light": (200, 200, 190)}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
RELATIONS: tuple[str, ...] = ("none", "above", "left of")
NUM_CLASSES = 2 * len(SHAPES)
CLASS_NAMES: tuple[str, ...] = tuple(f"{'one' if c == 1 else 'two'} {s}{'s' if c == 2 else ''}"
                                     for s in SHAPES for c in (1, 2))

#: first world index of each role; every role owns :data:`ROLE_SPAN` consecutive indices
ROLES: dict[str, int] = {"train": 0, "encoder": 10**8, "evaluator": 2 * 10**8, "reference": 3 * 10**8}
ROLE_SPAN = 10**8
RESOLUTIONS = (16, 32)

_FIELDS = ("shape", "count", "colour0", "colour1", "size0", "size1", "relation", "background",
           "x0", "y0", "x1", "y1")  # one independent uniform stream per field


@dataclass
class ShapesBatch:
    """Rendered images and what they show.

    images: (N, H, W, 3) uint8.  labels: (N,) int64 in [0, 10).  captions: N strings.
    attributes: ``shape`` (N,), ``count`` (N,) in {1, 2}, ``colour`` (N, 2), ``size`` (N, 2) (-1 where there is no
    second object), ``relation`` (N,) index into :data:`RELATIONS`, ``background`` (N,), ``centre`` (N, 2, 2)
    object centres (x, y) in pixels (NaN for a missing second object).
    """

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]
    attributes: dict[str, np.ndarray]


def world_indices(role: str, n: int, start: int = 0) -> np.ndarray:
    """The world indices of images ``start .. start + n - 1`` of ``role`` (one of :data:`ROLES`)."""
    if role not in ROLES:
        raise ValueError(f"unknown shapes role {role!r} (one of {', '.join(ROLES)})")
    if n < 0 or start < 0 or start + n > ROLE_SPAN:
        raise ValueError(f"shapes role {role!r} holds indices 0..{ROLE_SPAN - 1}, asked for {start}..{start + n - 1}")
    return np.arange(ROLES[role] + start, ROLES[role] + start + n, dtype=np.int64)


def _uniform(seed: int, idx: np.ndarray, field: str) -> np.ndarray:
    """Uniform [0, 1) floats, a splitmix64 hash of (seed, index, field): the same value for the same triple."""
    k = np.uint64(_FIELDS.index(field) + 1)
    with np.errstate(over="ignore"):
        x = idx.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed % 2**63) * np.uint64(
            0xBF58476D1CE4E5B9) + k * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _choice(u: np.ndarray, k: int) -> np.ndarray:
    return np.minimum((u * k).astype(np.int64), k - 1)


def _radius(size: np.ndarray, res: int) -> np.ndarray:
    return np.where(size == 1, 0.25, 0.17) * res  # large, small (16 px: 4.0 and 2.7 px)


def draw_attributes(indices: np.ndarray, seed: int = 0, resolution: int = 16) -> dict[str, np.ndarray]:
    """The attributes of world images ``indices`` (see :class:`ShapesBatch`), without rendering."""
    idx = np.asarray(indices, dtype=np.int64)
    u = {f: _uniform(seed, idx, f) for f in _FIELDS}
    n, res = len(idx), float(resolution)
    shape = _choice(u["shape"], len(SHAPES))
    count = 1 + _choice(u["count"], 2)
    two = count == 2
    colour = np.stack([_choice(u["colour0"], len(COLOURS)), _choice(u["colour1"], len(COLOURS))], 1)
    size = np.stack([_choice(u["size0"], 2), _choice(u["size1"], 2)], 1)
    colour[~two, 1] = -1
    size[~two, 1] = -1
    relation = np.where(two, 1 + _choice(u["relation"], 2), 0)
    background = _choice(u["background"], 2)
    r = _radius(size, resolution)  # (n, 2); the value of a missing object is unused
    centre = np.full((n, 2, 2), np.nan)

    def span(lo, hi, rad, uu):  # a centre in [lo + rad, hi - rad] (the middle if the interval is too short)
        a, b = lo + rad, hi - rad
        return np.where(b > a, a + uu * (b - a), (lo + hi) / 2)

    full = (0.0, res)
    # one object: anywhere
    one = ~two
    centre[one, 0, 0] = span(*full, r[one, 0], u["x0"][one])
    centre[one, 0, 1] = span(*full, r[one, 0], u["y0"][one])
    # two objects: the first in the upper (above) or left (left of) half, the second in the other half, both within
    # a band of res/8 on the other axis so that the relation is unambiguous
    for rel, axis in ((1, 1), (2, 0)):
        m = relation == rel
        other = 1 - axis
        centre[m, 0, axis] = span(0.0, res / 2, r[m, 0], u["y0" if axis else "x0"][m])
        centre[m, 1, axis] = span(res / 2, res, r[m, 1], u["y1" if axis else "x1"][m])
        centre[m, 0, other] = span(*full, r[m, 0], u["x0" if axis else "y0"][m])
        band = centre[m, 0, other] + (u["x1" if axis else "y1"][m] - 0.5) * res / 4
        centre[m, 1, other] = np.clip(band, r[m, 1], res - r[m, 1])
    return {"shape": shape, "count": count, "colour": colour, "size": size, "relation": relation,
            "background": background, "centre": centre}


def labels_of(attrs: dict[str, np.ndarray]) -> np.ndarray:
    """Class labels (N,) int64: ``2 * shape + (count - 1)``."""
    return (2 * attrs["shape"] + attrs["count"] - 1).astype(np.int64)


def captions_of(attrs: dict[str, np.ndarray]) -> list[str]:
    """One caption per image naming every attribute (the label's shape and count included)."""
    out = []
    for i in range(len(attrs["shape"])):
        shape = SHAPES[int(attrs["shape"][i])]
        objs = [f"a {SIZES[int(attrs['size'][i, k])]} {COLOUR_NAMES[int(attrs['colour'][i, k])]} {shape}"
                for k in range(int(attrs["count"][i]))]
        body = objs[0] if len(objs) == 1 else f"{objs[0]} {RELATIONS[int(attrs['relation'][i])]} {objs[1]}"
        out.append(f"{body} on a {BACKGROUND_NAMES[int(attrs['background'][i])]} background.")
    return out


def _masks(shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Coverage (N, S, S) of one object per image on the sample grid ``xs`` (S,) (pixel units)."""
    dx = xs[None, None, :] - cx[:, None, None]
    dy = xs[None, :, None] - cy[:, None, None]
    rr = r[:, None, None]
    d = np.hypot(dx, dy)
    out = np.zeros(dx.shape[:1] + (len(xs), len(xs)), dtype=bool)
    for k, name in enumerate(SHAPES):
        m = shape == k
        if not m.any():
            continue
        a, b, q = dx[m], dy[m], rr[m]
        if name == "circle":
            inside = d[m] <= q
        elif name == "square":
            inside = np.maximum(np.abs(a), np.abs(b)) <= 0.85 * q
        elif name == "triangle":  # apex up, base at +0.8 r
            h = b + q  # 0 at the apex (-r), 1.8 r at the base
            inside = (h >= 0) & (b <= 0.8 * q) & (np.abs(a) <= 0.6 * h)
        elif name == "ring":
            inside = (d[m] <= q) & (d[m] >= 0.5 * q)
        else:  # cross
            inside = ((np.abs(a) <= 0.32 * q) & (np.abs(b) <= q)) | ((np.abs(b) <= 0.32 * q) & (np.abs(a) <= q))
        out[m] = inside
    return out


def render(indices, *, seed: int = 0, resolution: int = 16, supersample: int = 2) -> ShapesBatch:
    """Render world images ``indices`` (any integers in a role's range, see :func:`world_indices`).

    Objects are drawn with ``supersample``² coverage samples per pixel (anti-aliased edges); the second object is
    drawn over the first. Deterministic: the same (seed, index, resolution) always gives the same pixels.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"shapes resolution must be one of {RESOLUTIONS}, got {resolution}")
    idx = np.asarray(indices, dtype=np.int64)
    attrs = draw_attributes(idx, seed, resolution)
    n, res, ss = len(idx), resolution, supersample
    xs = (np.arange(res * ss) + 0.5) / ss  # sample positions in pixel units
    bg = np.asarray(list(BACKGROUNDS.values()), dtype=np.float32)[attrs["background"]]  # (N, 3)
    img = np.broadcast_to(bg[:, None, None, :], (n, res, res, 3)).copy()
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    r = _radius(attrs["size"], res)
    for k in range(2):
        present = attrs["count"] > k
        if not present.any():
            continue
        sel = np.flatnonzero(present)
        cov = _masks(attrs["shape"][sel], attrs["centre"][sel, k, 0], attrs["centre"][sel, k, 1], r[sel, k], xs)
        cov = cov.reshape(len(sel), res, ss, res, ss).mean(axis=(2, 4), dtype=np.float32)[..., None]  # (n,H,W,1)
        col = palette[attrs["colour"][sel, k]][:, None, None, :]
        img[sel] = img[sel] * (1 - cov) + col * cov
    images = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return ShapesBatch(images, labels_of(attrs), captions_of(attrs), attrs)


def load_shapes(size: int, *, seed: int = 0, resolution: int = 16, role: str = "train", start: int = 0):
    """``size`` images of ``role`` as an :class:`reed.image.data.ImageDataset` named ``shapes`` (with captions)."""
    import torch

    from reed.image.data import ImageDataset

    b = render(world_indices(role, size, start), seed=seed, resolution=resolution)
    x = torch.from_numpy(b.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return ImageDataset("shapes", x.contiguous(), torch.from_numpy(b.labels), NUM_CLASSES, captions=b.captions)
