"""Target store: embed once, resume without duplicates or gaps, validate on open, train from it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reed.config import load_config
from reed.errors import DataError
from reed.image.data import load_dataset
from reed.image.targets.embed import embed_target
from reed.image.targets.fitted_encoder import ConvEncoder, load_encoder, save_encoder
from reed.store import TargetStore, TargetStoreWriter
from reed.train import train

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc") / "encoder"
    torch.manual_seed(0)
    save_encoder(ConvEncoder(1, dim=16, width=16).eval(), d)
    return d


def cfg_for(encoder_dir, tmp_path, *extra):
    return load_config(DEMO, [f"targets.0.path={encoder_dir}", f"train.cache_dir={tmp_path / 'cache'}",
                              "train.progress=false", *extra])


def test_embed_matches_direct_computation_and_resumes(encoder_dir, tmp_path):
    cfg = cfg_for(encoder_dir, tmp_path)
    out = tmp_path / "store"
    rep = embed_target(cfg, "ssl", out, dtype="float32", shard_size=500, progress=False)
    assert rep["shape"] == [16, 16] and rep["count"] == 1797 and rep["written"] == 4
    store = TargetStore(out, expect_count=1797, expect_dim=16)
    ds = load_dataset(cfg.image.data)
    enc = load_encoder(encoder_dir)
    idx = torch.tensor([1796, 0, 501, 3, 1000])
    with torch.no_grad():
        direct = enc.tokens(ds.images[idx])
    assert torch.allclose(store.get(idx), direct, atol=1e-5)
    man = json.loads((out / "manifest.json").read_text())
    assert man["dataset_fingerprint"] == ds.fingerprint and man["preprocessing"]["kind"] == "tokens"
    before = {p.name: p.read_bytes() for p in out.glob("z_*.npy")}
    # interrupted run: one shard lost, a stray temp file left behind -> rerun redoes exactly that shard
    (out / "z_00002.npy").unlink()
    (out / ".z_00003.npy.tmp-1").write_bytes(b"partial")
    rep2 = embed_target(cfg, "ssl", out, dtype="float32", shard_size=500, progress=False)
    assert rep2["written"] == 1 and rep2["skipped"] == 3
    assert {p.name: p.read_bytes() for p in out.glob("z_*.npy")} == before


def test_two_processes_equal_one(encoder_dir, tmp_path):
    cfg = cfg_for(encoder_dir, tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    embed_target(cfg, "ssl", one, shard_size=400, progress=False)
    # process 1 first (it must not write the manifest), then process 0 finishes and finalizes
    r1 = embed_target(cfg, "ssl", two, shard_size=400, progress=False, process_index=1, num_processes=2)
    assert r1["written"] == 2 and not (two / "manifest.json").exists()
    with pytest.raises(DataError, match="manifest not found.*unfinished"):
        TargetStore(two)
    embed_target(cfg, "ssl", two, shard_size=400, progress=False, process_index=0, num_processes=2)
    a, b = TargetStore(one), TargetStore(two)
    assert torch.equal(a.get(np.arange(1797)), b.get(np.arange(1797)))
    assert a.meta["dtype"] == "float16"


def test_store_validation_errors(tmp_path):
    w = TargetStoreWriter(tmp_path / "s", source="t", count=10, shape=(4,), dtype="float32", shard_size=4,
                          dataset_fingerprint="abc")
    w.write(lambda idx: torch.ones(len(idx), 4), progress=False)
    w.finalize()
    TargetStore(tmp_path / "s", expect_count=10, expect_dim=4, expect_dataset="abc")
    with pytest.raises(DataError, match="10 rows but the data set has 11"):
        TargetStore(tmp_path / "s", expect_count=11)
    with pytest.raises(DataError, match="dimension 4, expected 8"):
        TargetStore(tmp_path / "s", expect_dim=8)
    with pytest.raises(DataError, match="different data set"):
        TargetStore(tmp_path / "s", expect_dataset="xyz")
    arr = np.load(tmp_path / "s" / "z_00001.npy")
    arr[0, 0] = np.nan
    np.save(tmp_path / "s" / "z_00001.npy", arr)
    with pytest.raises(DataError, match="z_00001.npy contains NaN"):
        TargetStore(tmp_path / "s")
    (tmp_path / "s" / "z_00002.npy").unlink()
    with pytest.raises(DataError, match="shard missing: .*z_00002.npy"):
        TargetStore(tmp_path / "s")
    with pytest.raises(DataError, match="manifest not found"):
        TargetStore(tmp_path / "nothing")
    # a source that emits NaN never writes the shard
    w2 = TargetStoreWriter(tmp_path / "n", source="bad", count=3, shape=(2,), shard_size=3)
    with pytest.raises(DataError, match="NaN/inf for examples 0..2"):
        w2.write(lambda idx: torch.full((len(idx), 2), float("nan")), progress=False)
    assert not list((tmp_path / "n").glob("z_*.npy"))
    with pytest.raises(DataError, match="different job"):
        TargetStoreWriter(tmp_path / "n", source="bad", count=4, shape=(2,), shard_size=3)


def test_train_from_store_equals_train_from_cache(encoder_dir, tmp_path):
    base = ["train.steps=4", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
            "objective.method=repa"]
    cfg = cfg_for(encoder_dir, tmp_path, *base)
    embed_target(cfg, "ssl", tmp_path / "store", dtype="float32", progress=False)
    a = train(cfg, tmp_path / "cached")
    cfg_s = cfg_for(encoder_dir, tmp_path, *base, "targets.0.source=store", f"targets.0.path={tmp_path / 'store'}")
    b = train(cfg_s, tmp_path / "stored")
    la = [json.loads(x)["loss"] for x in (a.run_dir / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-5)
    # the store remembers the encoder's weights: a refitted encoder makes it stale
    other = tmp_path / "other-encoder"
    torch.manual_seed(1)
    save_encoder(ConvEncoder(1, dim=16, width=16).eval(), other)
    stale = cfg_for(other, tmp_path, *base, f"targets.0.store={tmp_path / 'store'}")
    with pytest.raises(DataError, match="different encoder weights"):
        train(stale, tmp_path / "stale")
    bad = cfg_for(encoder_dir, tmp_path, *base, "targets.0.source=store", f"targets.0.path={tmp_path / 'store'}",
                  "targets.0.kind=pooled")
    with pytest.raises(DataError, match="kind 'pooled' needs"):
        train(bad, tmp_path / "bad")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_low_precision_stores_round_trip_within_their_precision(tmp_path, dtype):
    """Per value: float16 keeps 11 significant bits, bfloat16 8, int8 a step of max|v|/127 per vector (its scale);
    what a batch copies to the device is the stored dtype, dequantized there to float32."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 3, 16, generator=g) * torch.tensor([1.0, 1e-3, 300.0])[:, None]  # (N, T, D), mixed scales
    w = TargetStoreWriter(tmp_path / dtype, source="t", count=10, shape=(3, 16), dtype=dtype, shard_size=4)
    w.write(lambda idx: z[torch.as_tensor(idx)], progress=False)
    w.finalize()
    store = TargetStore(tmp_path / dtype)
    assert store.meta["version"] == (1 if dtype == "float16" else 2)  # a version-1 reader refuses, never misreads
    idx = [7, 0, 3, 9, 4]
    got = store.get(idx)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 16)
    want = z[idx]
    amax = want.abs().amax(-1, keepdim=True)
    if dtype == "int8":
        bound = amax / 254 + 1e-7  # half a quantisation step of each vector
    else:
        bound = want.abs() * (2.0 ** -11 if dtype == "float16" else 2.0 ** -8) + 1e-8
    assert ((got - want).abs() <= bound).all()
    values, scale = store.get_stored(idx)
    assert values.dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}[dtype]
    assert (scale is not None) == (dtype == "int8")
    if dtype == "int8":
        assert scale.shape == (5, 3) and values.abs().amax(-1).eq(127).all()  # each vector spans the full range
        files = list((tmp_path / dtype).glob("[zs]_*.npy"))
        payload = sum(f.stat().st_size - 128 for f in files)  # less each .npy header
        assert len(files) == 6 and payload == 10 * 3 * (16 * 1 + 4)  # 1 byte per value + a float32 per vector


def test_int8_store_without_its_scales_is_refused_and_the_shard_redone(tmp_path):
    w = TargetStoreWriter(tmp_path / "q", source="t", count=6, shape=(4,), dtype="int8", shard_size=3)
    w.write(lambda idx: torch.ones(len(idx), 4), progress=False)
    w.finalize()
    (tmp_path / "q" / "s_00001.npy").unlink()
    with pytest.raises(DataError, match="shard missing: .*s_00001.npy"):
        TargetStore(tmp_path / "q")
    assert not w.done(1) and w.done(0)


def test_training_from_an_int8_store_follows_the_float32_one(encoder_dir, tmp_path):
    base = ["train.steps=3", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
            "objective.method=repa"]
    cfg = cfg_for(encoder_dir, tmp_path, *base)
    runs = {}
    for dtype in ("float32", "int8"):
        embed_target(cfg, "ssl", tmp_path / dtype, dtype=dtype, progress=False)
        c = cfg_for(encoder_dir, tmp_path, *base, "targets.0.source=store", f"targets.0.path={tmp_path / dtype}")
        run = train(c, tmp_path / f"run_{dtype}").run_dir
        runs[dtype] = [json.loads(x)["loss_align"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert runs["int8"] == pytest.approx(runs["float32"], abs=2e-3)
