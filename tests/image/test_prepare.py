"""Data preparation: ADM crop, ImageFolder listing, image shards (sharding, resume, skipped files), VAE latents."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reed.errors import DataError
from reed.image.prepare import center_crop_adm, list_image_folder, prepare_images, prepare_latents
from reed.image.shards import ImageShards, LatentShards, sample_posterior

R = 8
LISTED = [  # sorted by (class folder, relative path); labels: ant=0, moth=1, zebra=2
    ("ant/fake.png", 0), ("ant/x.png", 0), ("ant/y.JPEG", 0),
    ("moth/broken.jpg", 1), ("moth/m1.png", 1), ("moth/m2.jpg", 1),
    ("zebra/a.jpg", 2), ("zebra/b.png", 2), ("zebra/empty.jpg", 2), ("zebra/sub/c.png", 2),
]
BAD = {"ant/fake.png", "moth/broken.jpg", "zebra/empty.jpg"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """ImageFolder tree: 3 classes (made in unsorted order), PNG/JPEG of many sizes and modes, 3 unreadable files."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)

    def save(rel: str, w: int, h: int, mode: str = "RGB") -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(p)

    save("zebra/b.png", 20, 12)
    save("zebra/a.jpg", 9, 31)
    save("zebra/sub/c.png", 16, 16, "RGBA")
    save("ant/x.png", 33, 17, "L")
    save("ant/y.JPEG", 12, 12)
    save("moth/m1.png", 8, 8)
    save("moth/m2.jpg", 50, 10)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    (root / "moth/broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])  # truncated JPEG
    (root / "ant/fake.png").write_text("this is not a PNG")
    (root / "zebra/empty.jpg").write_bytes(b"")
    (root / "ant/notes.txt").write_text("not an image extension: ignored")
    (root / ".hidden").mkdir()
    return root


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images")
    prepare_images(tree, out, resolution=R, shard_size=2, progress=False)
    return out


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


# ----------------------------------------------------------------------------------------------- crop and listing


def _blocks(rows: int, cols: int) -> np.ndarray:
    """(rows, cols, 3) uint8, every cell a distinct colour."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([r * 20 + 5, c * 30 + 7, (r * cols + c) * 9 % 256], -1).astype(np.uint8)


def test_center_crop_adm_matches_hand_computation():
    r = 4
    blocks = _blocks(3 * r // 2, r)  # 6 x 4 cells; each cell 2x2 pixels -> a 2R x 3R (W x H) picture
    img = Image.fromarray(np.repeat(np.repeat(blocks, 2, 0), 2, 1))
    assert img.size == (2 * r, 3 * r)
    # short side 8 >= 2R: one BOX halving gives the cells exactly (4 x 6), no resize needed, centre rows 1..4
    np.testing.assert_array_equal(center_crop_adm(img, r), blocks[1:5, :])
    # landscape: columns 1..4
    land = Image.fromarray(np.repeat(np.repeat(blocks.transpose(1, 0, 2), 2, 0), 2, 1))
    np.testing.assert_array_equal(center_crop_adm(land, r), blocks.transpose(1, 0, 2)[:, 1:5])
    # short side < 2R: only BICUBIC to short side R (5x10 -> 4x8), then rows 2..5
    small = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 5, 3), dtype=np.uint8))
    want = np.asarray(small.resize((4, 8), resample=Image.BICUBIC))[2:6]
    np.testing.assert_array_equal(center_crop_adm(small, r), want)
    # grey input becomes RGB; output is always (R, R, 3) uint8
    out = center_crop_adm(Image.new("L", (37, 23), 77), r)
    assert out.shape == (r, r, 3) and out.dtype == np.uint8 and (out == 77).all()


def test_list_image_folder_labels_follow_sorted_folders(tree, tmp_path):
    items, classes = list_image_folder(tree)
    assert classes == ["ant", "moth", "zebra"]
    assert items == LISTED
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="flat.*no class"):
        list_image_folder(tmp_path / "flat")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="noimg.*no image"):
        list_image_folder(tmp_path / "noimg")


# ----------------------------------------------------------------------------------------------- image shards


def test_prepare_images_shards_labels_and_skipped(tree, tmp_path, capsys):
    out = tmp_path / "img"
    rep = prepare_images(tree, out, resolution=R, shard_size=2, progress=False)
    printed = capsys.readouterr().err
    m = _manifest(out)
    assert m["kind"] == "reed.images" and m["version"] == 1 and m["resolution"] == R and m["shard_size"] == 2
    assert m["classes"] == ["ant", "moth", "zebra"] and m["num_classes"] == 3 and m["source"] == str(tree.resolve())
    # every unreadable file is reported by name with an error, in the manifest, the report and on stderr
    assert {s["file"] for s in m["skipped"]} == BAD and all(s["error"] for s in m["skipped"])
    assert {s["file"] for s in rep["skipped"]} == BAD and rep["count"] == m["count"] == len(LISTED) - len(BAD)
    assert rep["written"] == [0, 1, 2, 3, 4] and rep["manifest"] == str(out / "manifest.json")
    for name in BAD:
        assert name in printed
    assert "3 skipped" in printed
    # shard i holds listed files [2i, 2i+2) minus the skipped ones; rows of images/labels/sources stay aligned
    assert [s["count"] for s in m["shards"]] == [1, 1, 2, 2, 1]
    for s in m["shards"]:
        i = s["index"]
        assert s["images"] == f"images_{i:05d}.npy" and s["sources"] == f"sources_{i:05d}.txt"
        want = [(rel, lab) for rel, lab in LISTED[2 * i : 2 * i + 2] if rel not in BAD]
        sources = (out / s["sources"]).read_text().splitlines()
        labels = np.load(out / s["labels"])
        images = np.load(out / s["images"])
        assert labels.dtype == np.int64 and images.dtype == np.uint8 and images.shape == (s["count"], R, R, 3)
        assert list(zip(sources, labels.tolist())) == want
        for row, rel in zip(images, sources):
            np.testing.assert_array_equal(row, center_crop_adm(Image.open(tree / rel), R))
    # the reader: labels, any-order gather across shards, sources
    ds = ImageShards(out)
    assert len(ds) == 7 and ds.resolution == R and ds.fingerprint == m["fingerprint"]
    good = [(rel, lab) for rel, lab in LISTED if rel not in BAD]
    assert ds.labels.tolist() == [lab for _, lab in good]
    idx = np.array([6, 0, 3, 3, 1])
    got = ds.images(idx)
    assert got.shape == (5, R, R, 3)
    for row, j in zip(got, idx):
        np.testing.assert_array_equal(row, center_crop_adm(Image.open(tree / good[j][0]), R))
    assert ds.sources(idx) == [good[j][0] for j in idx]
    ds.verify()
    with pytest.raises(IndexError):
        ds.images([7])


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith("shard_")}


def test_two_processes_equal_one_and_resume(tree, prepared, tmp_path):
    out = tmp_path / "img2"
    r0 = prepare_images(tree, out, resolution=R, shard_size=2, process_index=0, num_processes=2, progress=False)
    assert r0["shards"] == [0, 2, 4] and r0["manifest"] is None and r0["pending"] == [1, 3]
    assert not (out / "manifest.json").exists()
    r1 = prepare_images(tree, out, resolution=R, shard_size=2, process_index=1, num_processes=2, progress=False)
    assert r1["shards"] == [1, 3] and r1["manifest"] is not None
    assert _manifest(out) == _manifest(prepared)
    assert _snapshot(out) == _snapshot(prepared)
    threads = tmp_path / "threads"
    prepare_images(tree, threads, resolution=R, shard_size=2, num_workers=2, progress=False)
    assert _snapshot(threads) == _snapshot(prepared)

    def rerun() -> list[list[int]]:
        return [prepare_images(tree, out, resolution=R, shard_size=2, process_index=p, num_processes=2,
                               progress=False)["written"] for p in (0, 1)]

    assert rerun() == [[], []]  # nothing to do
    (out / "images_00003.npy").unlink()  # a deleted shard is redone by its owner
    assert rerun() == [[], [3]]
    assert _snapshot(out) == _snapshot(prepared)
    (out / "labels_00002.npy.tmp12345").write_bytes(b"half")  # an interrupted shard is redone, temp removed
    raw = bytearray((out / "images_00000.npy").read_bytes())
    raw[-1] ^= 0xFF  # damaged data fails the re-hash
    (out / "images_00000.npy").write_bytes(bytes(raw))
    assert rerun() == [[0, 2], []]
    assert _snapshot(out) == _snapshot(prepared)
    assert not list(out.glob("*.tmp*"))


def test_image_reader_rejects_bad_manifest(prepared, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(prepared, d)
    m = _manifest(d)
    m["shards"][0]["count"] = 5
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="images_00000.npy"):
        ImageShards(d)
    m = _manifest(prepared)
    m["count"] = 8
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="count is 8"):
        ImageShards(d)
    m["count"], m["kind"] = 7, "reed.latents"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="kind"):
        ImageShards(d)
    shutil.copy(prepared / "manifest.json", d / "manifest.json")
    (d / "labels_00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="labels_00001.npy"):
        ImageShards(d)


# ----------------------------------------------------------------------------------------------- latents


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    )
    d = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(d)
    return d


def test_prepare_latents_match_vae_posterior(prepared, tiny_vae, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "lat"
    rep = prepare_latents(prepared, out, vae=tiny_vae, batch_size=3, progress=False)
    m = _manifest(out)
    assert rep["written"] == [0, 1, 2, 3, 4] and m["count"] == 7
    assert m["kind"] == "reed.latents" and m["version"] == 1 and m["scale"] == 0.18215 and m["shift"] == 0.0
    assert m["latent_channels"] == 4 and m["latent_size"] == R // 2 and m["dtype"] == "float32"
    assert m["images"] == str(prepared.resolve()) and m["images_fingerprint"] == _manifest(prepared)["fingerprint"]
    assert m["vae"] == str(tiny_vae.resolve()) and len(m["vae_fingerprint"]) == 64
    lat = LatentShards(out)
    imgs = ImageShards(prepared)
    assert len(lat) == 7 and lat.fingerprint == m["fingerprint"]
    np.testing.assert_array_equal(lat.labels, imgs.labels)
    mom = lat.moments(np.arange(7))
    assert mom.shape == (7, 8, R // 2, R // 2) and mom.dtype == np.float32
    # mean / std are the VAE's own posterior on x/127.5 - 1
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    x = torch.from_numpy(imgs.images(np.arange(7))).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    np.testing.assert_allclose(mom[:, :4], dist.mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mom[:, 4:], dist.std.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(lat.moments([5, 2]), mom[[5, 2]])

    # rerun: nothing rewritten; two processes give the same shards; float16 storage
    again = prepare_latents(prepared, out, vae=tiny_vae, batch_size=3, progress=False)
    assert again["written"] == [] and _manifest(out) == m
    two = tmp_path / "lat2"
    for p in (0, 1):
        prepare_latents(prepared, two, vae=tiny_vae, batch_size=3, process_index=p, num_processes=2, progress=False)
    assert _manifest(two)["fingerprint"] == m["fingerprint"]
    half = tmp_path / "lat16"
    prepare_latents(prepared, half, vae=tiny_vae, dtype="float16", progress=False)
    assert np.load(half / "moments_00000.npy").dtype == np.float16
    np.testing.assert_allclose(LatentShards(half).moments(np.arange(7)), mom, rtol=2e-3, atol=1e-4)

    # the reader rejects a wrong count or a missing shard, naming the file
    bad = _manifest(out)
    bad["shards"][2]["count"] = 1
    (two / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="moments_00002.npy"):
        LatentShards(two)
    (half / "moments_00003.npy").unlink()
    with pytest.raises(FileNotFoundError, match="moments_00003.npy"):
        LatentShards(half)


def test_missing_vae_is_a_clear_error(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        prepare_latents(prepared, tmp_path / "l", vae=tmp_path / "no_such_vae", progress=False)
    with pytest.raises(FileNotFoundError, match="nobody/no-such-vae"):
        prepare_latents(prepared, tmp_path / "l", vae="nobody/no-such-vae", progress=False)


def test_sample_posterior_formula():
    moments = torch.randn(3, 8, 4, 4)
    moments[:, 4:] = moments[:, 4:].abs()
    z = sample_posterior(moments, 0.18215, 0.5, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, (moments[:, :4] + moments[:, 4:] * eps) * 0.18215 + 0.5)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0])
    z = sample_posterior(moments, scale, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, (moments[:, :4] + moments[:, 4:] * eps) * scale.view(1, 4, 1, 1))
    assert not torch.equal(sample_posterior(moments, 1.0), sample_posterior(moments, 1.0))  # fresh noise per call
    with pytest.raises(ValueError, match="even"):
        sample_posterior(torch.zeros(1, 3, 2, 2), 1.0)
