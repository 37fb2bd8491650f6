"""The yardstick's world (reed.image.shapes): deterministic per index, disjoint roles, captions that say what the
pixels show, and an evaluator that reads the attributes of real images."""

import re

import numpy as np
import pytest
import torch

from reed.config import load_config
from reed.image.shapes import (
    BACKGROUNDS,
    COLOURS,
    RELATIONS,
    ROLE_SPAN,
    ROLES,
    SHAPES,
    SIZES,
    draw_attributes,
    render,
    world_indices,
)


def test_each_image_is_a_pure_function_of_seed_and_index():
    idx = world_indices("train", 300)
    a, b = render(idx), render(idx)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    sub = render(idx[[7, 250, 3]])  # any subset, any order: the same images
    assert np.array_equal(sub.images, a.images[[7, 250, 3]]) and sub.captions == [a.captions[i] for i in (7, 250, 3)]
    other = render(idx, seed=1)
    assert (other.images != a.images).any(axis=(1, 2, 3)).mean() > 0.95
    assert a.images.shape == (300, 16, 16, 3) and a.images.dtype == np.uint8
    assert render(idx[:4], resolution=32).images.shape == (4, 32, 32, 3)
    # every class and every attribute value occurs
    assert set(a.labels.tolist()) == set(range(10)) and set(a.attributes["relation"].tolist()) == {0, 1, 2}


def test_the_four_roles_are_disjoint_index_ranges():
    ranges = {r: world_indices(r, 5000) for r in ROLES}
    starts = sorted(ROLES.values())
    assert all(b - a == ROLE_SPAN for a, b in zip(starts, starts[1:]))
    seen = set()
    for r, idx in ranges.items():
        assert not seen & set(idx.tolist()), r
        seen |= set(idx.tolist())
    with pytest.raises(ValueError, match="holds indices"):
        world_indices("train", 10, start=ROLE_SPAN - 5)
    # the generator's training set and the encoder's fitting set share no image
    tr, enc = render(ranges["train"][:500]), render(ranges["encoder"][:500])
    assert not {x.tobytes() for x in tr.images} & {x.tobytes() for x in enc.images} or len(
        {x.tobytes() for x in tr.images} & {x.tobytes() for x in enc.images}) < 5  # only chance coincidences


_CAPTION = re.compile(r"^a (small|large) (\w+) (\w+)(?: (above|left of) a (small|large) (\w+) (\w+))? on a "
                      r"(dark|light) background\.$")


def test_captions_name_what_the_pixels_show():
    n = 400
    b = render(world_indices("train", n))
    palette = np.asarray(list(COLOURS.values()), dtype=np.int64)
    for i in range(n):
        m = _CAPTION.match(b.captions[i])
        assert m, b.captions[i]
        size0, col0, shp, rel, size1, col1, shp1, bg = m.groups()
        a = b.attributes
        assert SHAPES[a["shape"][i]] in (shp, shp.rstrip("s")) and SIZES[a["size"][i, 0]] == size0
        assert b.labels[i] == 2 * SHAPES.index(shp) + (0 if rel is None else 1)
        img = b.images[i].reshape(-1, 3).astype(np.int64)
        # background: the most common colour is the named background
        values, counts = np.unique(img, axis=0, return_counts=True)
        assert tuple(values[counts.argmax()]) == BACKGROUNDS[bg]
        # each named object's colour covers pixels, and nothing else but anti-aliased edges does
        named = [col0] if rel is None else [col0, col1]
        for col in named:
            assert (np.abs(img - np.asarray(COLOURS[col])).sum(1) == 0).sum() >= 4, (b.captions[i], col)
        exact = [c for c in range(len(palette)) if (np.abs(img - palette[c]).sum(1) == 0).sum() >= 2]
        assert {list(COLOURS)[c] for c in exact} == set(named), b.captions[i]
        if rel is not None:
            assert shp1 == shp and RELATIONS[a["relation"][i]] == rel
            if col0 != col1:  # the first object is above / left of the second where the pixels are
                ys, xs = np.divmod(np.arange(256), 16)
                c0 = (np.abs(img - np.asarray(COLOURS[col0])).sum(1) == 0)
                c1 = (np.abs(img - np.asarray(COLOURS[col1])).sum(1) == 0)
                axis = ys if rel == "above" else xs
                assert axis[c0].mean() < axis[c1].mean(), b.captions[i]


def test_attributes_match_render_and_captions_for_32px():
    idx = world_indices("reference", 50)
    attrs = draw_attributes(idx, 0, 32)
    b = render(idx, resolution=32)
    assert np.array_equal(attrs["shape"], b.attributes["shape"])
    assert np.allclose(attrs["centre"], b.attributes["centre"], equal_nan=True)
    c = attrs["centre"]
    assert np.nanmin(c) >= 0 and np.nanmax(c) <= 32


def test_shapes_data_config_and_encoder_world_range(tmp_path):
    from reed.image.cli import fit_dataset
    from reed.image.data import load_dataset

    cfg = load_config(None, ["image.data.name=shapes", "image.data.size=64", "image.fit.world_size=128"])
    ds = load_dataset(cfg.image.data)
    assert ds.images.shape == (64, 3, 16, 16) and ds.num_classes == 10 and len(ds.captions) == 64
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    fit = fit_dataset(cfg)
    assert len(fit) == 128 and not torch.equal(fit.images[:64], ds.images)
    own = fit_dataset(load_config(None, ["image.data.name=shapes", "image.data.size=64"]))
    assert torch.equal(own.images, ds.images)


def test_evaluator_reads_real_images_and_catches_wrong_ones(tmp_path):
    from reed.image.metrics.shapes_eval import shapes_evaluator

    cfg = load_config(None, ["image.data.name=shapes"])
    ev = shapes_evaluator(cfg.image.data, tmp_path, train_size=4000, steps=700, batch_size=128)
    acc = ev.held_out_accuracy
    assert acc["count"] > 0.95 and acc["background"] > 0.95 and acc["class"] > 0.6, acc
    real = ev.real(400)
    assert real["accuracy"] > 0.6 and real["malformed"] < 0.3 and max(real["attribute_tv"].values()) < 0.1
    b = render(world_indices("reference", 400, start=20000))
    x = torch.from_numpy(b.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(b.labels)
    wrong = ev(x, (y + 2) % 10)  # right images, wrong labels (other shape)
    assert wrong["attribute_accuracy"]["shape"] < 0.3 and wrong["accuracy"] < 0.3
    noise = ev(torch.rand_like(x) * 2 - 1, y)
    assert noise["fd"] > 3 * real["fd"]
    assert ev(x, y)["fd"] < 2 * real["fd"]
    again = shapes_evaluator(cfg.image.data, tmp_path, train_size=4000, steps=700, batch_size=128)  # cached
    assert again.held_out_accuracy == acc
