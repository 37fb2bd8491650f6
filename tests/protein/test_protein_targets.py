"""Per-protein alignment targets: store round trip, sequence checks, padding, masked standardisation, ESM-2, AF3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reed.align import masked_standardize
from reed.errors import DataError, ReedError
from reed.protein.targets import (
    ProteinTargetStore,
    ProteinTargetWriter,
    embed_proteins_esm2,
    esm2_embeddings,
    import_af3_embeddings,
    read_af3_job_sequence,
    save_random_esm2,
)

ESM_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "D", "I", "K", "P", "N",
             "Q", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>"]


def _arrays(rng, L, ds=8, dp=4, dst=6, scale=1.0):
    return {"single": (rng.standard_normal((L, ds)) * scale).astype(np.float32),
            "pair": (rng.standard_normal((L, L, dp)) * scale).astype(np.float32),
            "structure": (rng.standard_normal((L, dst)) * scale).astype(np.float32)}


# ------------------------------------------------------------------------------------------------ store


def test_round_trip_index_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "store"
    seqs = {"1abc_A": "ACDEFGHIKL", "2xyz/B": "MKV", "small": "GGSAW"}
    data = {n: _arrays(rng, len(s)) for n, s in seqs.items()}
    data["small"]["structure"] = (rng.uniform(0.1, 1.0, (5, 6)) * rng.choice([-1, 1], (5, 6)) * 1e-3).astype(
        np.float32)
    data["small"]["structure"][0, 0] = 3e-7  # far below the array max: still precise thanks to the scale
    w = ProteinTargetWriter(root, meta={"source": "test"})
    for n in ["1abc_A", "2xyz/B"]:
        w.add(n, seqs[n], data[n])
    assert w.has("1abc_A") and not w.has("small")
    # an interrupted run: no close(); a new writer picks up the items written so far
    w2 = ProteinTargetWriter(root, meta={"source": "test"})
    assert w2.has("1abc_A") and w2.has("2xyz/B") and len(w2) == 2
    with pytest.raises(DataError, match="already in"):
        w2.add("1abc_A", seqs["1abc_A"], data["1abc_A"])
    w2.add("small", seqs["small"], data["small"])
    w2.close()

    index = json.loads((root / "index.json").read_text())
    assert index["format"] == "reed-protein-targets" and index["version"] == 1
    assert index["targets"] == {"single": 8, "pair": 4, "structure": 6}
    assert index["meta"]["source"] == "test"
    assert set(index["items"]) == set(seqs)
    for n, s in seqs.items():
        e = index["items"][n]
        assert e["length"] == len(s) and e["sequence"] == s and (root / e["file"]).is_file()
        assert e["file"].startswith("items/") and e["file"].endswith(".npz")
    assert "/" not in index["items"]["2xyz/B"]["file"][len("items/"):]

    store = ProteinTargetStore(root)
    assert len(store) == 3 and "small" in store and "nope" not in store
    assert sorted(store.names) == sorted(seqs)
    assert store.dims == {"single": 8, "pair": 4, "structure": 6}
    for n, s in seqs.items():
        got = store.get(n, s, ["single", "pair", "structure"])
        for k, v in data[n].items():
            assert got[k].dtype == np.float32 and got[k].shape == v.shape
            np.testing.assert_allclose(got[k], v, rtol=1e-3, atol=1e-3 * np.abs(v).max())
    small = store.get("small", seqs["small"], ["structure"])["structure"]
    ref = data["small"]["structure"]
    assert np.max(np.abs(small - ref) / np.abs(ref)) < 1e-3
    # without the scale, fp16 would have lost the tiny entry (subnormal) -- shows the scale matters
    assert abs(float(np.float16(3e-7)) - 3e-7) / 3e-7 > 1e-3

    # a writer with different settings refuses to mix into the store; overwrite starts over
    with pytest.raises(DataError, match="different settings"):
        ProteinTargetWriter(root, meta={"source": "other"})
    w3 = ProteinTargetWriter(root, meta={"source": "other"}, overwrite=True)
    assert len(w3) == 0
    w3.close()
    assert len(ProteinTargetStore(root)) == 0


def test_large_magnitude_does_not_overflow(tmp_path):
    x = np.linspace(-2e5, 3e5, 12, dtype=np.float32).reshape(3, 4)
    w = ProteinTargetWriter(tmp_path)
    w.add("big", "AAA", {"single": x})
    w.close()
    got = ProteinTargetStore(tmp_path).get("big", "AAA", ["single"])["single"]
    np.testing.assert_allclose(got, x, rtol=1e-3)


def test_all_zero_target_is_refused_and_some_zero_rows_warn(tmp_path):
    w = ProteinTargetWriter(tmp_path)
    with pytest.raises(DataError, match=r"protein target 'z', kind 'single': all 3 target vectors have zero"):
        w.add("z", "AAA", {"single": np.zeros((3, 4), np.float32)})
    x = np.ones((3, 4), np.float32)
    x[1] = 0
    with pytest.warns(UserWarning, match=r"protein target 'p', kind 'single': 1 of 3 target vectors have zero"):
        w.add("p", "AAA", {"single": x})


def test_add_validation(tmp_path):
    w = ProteinTargetWriter(tmp_path)
    with pytest.raises(DataError, match=r"'c1'.*single.*sequence length 4"):
        w.add("c1", "ACDE", {"single": np.zeros((5, 3), np.float32)})
    with pytest.raises(DataError, match=r"'c1'.*pair.*sequence length 4"):
        w.add("c1", "ACDE", {"pair": np.zeros((4, 3, 2), np.float32)})
    bad = np.zeros((4, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match=r"'c1'.*NaN"):
        w.add("c1", "ACDE", {"single": bad})
    with pytest.raises(DataError, match="float"):
        w.add("c1", "ACDE", {"single": np.zeros((4, 3), np.int64)})
    w.add("c1", "ACDE", {"single": np.ones((4, 3), np.float32)})
    with pytest.raises(DataError, match="channels"):
        w.add("c2", "AC", {"single": np.ones((2, 5), np.float32)})
    with pytest.raises(DataError, match="kinds"):
        w.add("c2", "AC", {"single": np.ones((2, 3), np.float32), "structure": np.ones((2, 3), np.float32)})
    assert not w.has("c2")


def test_sequence_check_and_window(tmp_path):
    rng = np.random.default_rng(1)
    full = "MHHHHHHSSGACDEFGHIKLMN"
    a = _arrays(rng, len(full))
    w = ProteinTargetWriter(tmp_path)
    w.add("5naf_B", full, a)
    w.add("rep", "ACACAC", _arrays(rng, 6))
    w.close()
    store = ProteinTargetStore(tmp_path)

    exact = store.get("5naf_B", full, ["single", "pair", "structure"])
    np.testing.assert_allclose(exact["single"], a["single"], atol=5e-3)

    trimmed = full[7:]  # His-tag removed: a unique window of the stored sequence
    got = store.get("5naf_B", trimmed, ["single", "pair", "structure"])
    L = len(trimmed)
    assert got["single"].shape == (L, 8) and got["pair"].shape == (L, L, 4) and got["structure"].shape == (L, 6)
    np.testing.assert_allclose(got["single"], exact["single"][7:], atol=0)
    np.testing.assert_allclose(got["pair"], exact["pair"][7:, 7:], atol=0)
    np.testing.assert_allclose(got["structure"], exact["structure"][7:], atol=0)

    with pytest.raises(DataError, match=r"(?s)chain '5naf_B'.*example: ACDEFGHIKW.*stored:  MHHHHHH"):
        store.get("5naf_B", "ACDEFGHIKW", ["single"])  # same length prefix slicing would have hidden this
    with pytest.raises(DataError, match=r"chain '5naf_B'"):
        store.get("5naf_B", full + "A", ["single"])
    with pytest.raises(DataError, match=r"chain 'rep'.*more than once"):
        store.get("rep", "ACA", ["single"])
    with pytest.raises(DataError, match=r"chain 'missing_X'"):
        store.get("missing_X", "ACD", ["single"])
    with pytest.raises(DataError, match="no kind"):
        store.get("5naf_B", full, ["msa"])


def test_batch_padding(tmp_path):
    rng = np.random.default_rng(2)
    w = ProteinTargetWriter(tmp_path)
    a1, a2 = _arrays(rng, 3), _arrays(rng, 5)
    w.add("a", "ACD", a1)
    w.add("b", "GHIKL", a2)
    w.close()
    store = ProteinTargetStore(tmp_path)
    out = store.batch(["b", "a"], ["GHIKL", "ACD"], ["single", "pair", "structure"], max_len=7)
    assert out["single"].shape == (2, 7, 8) and out["structure"].shape == (2, 7, 6)
    assert out["pair"].shape == (2, 7, 7, 4)
    assert all(t.dtype == torch.float32 for t in out.values())
    assert out["single"][0, 5:].abs().sum() == 0 and out["single"][1, 3:].abs().sum() == 0
    assert out["pair"][1, 3:].abs().sum() == 0 and out["pair"][1, :, 3:].abs().sum() == 0
    assert out["pair"][0, 5:].abs().sum() == 0 and out["pair"][0, :, 5:].abs().sum() == 0
    torch.testing.assert_close(out["single"][1, :3], torch.from_numpy(a1["single"]), atol=5e-3, rtol=1e-3)
    torch.testing.assert_close(out["pair"][0, :5, :5], torch.from_numpy(a2["pair"]), atol=5e-3, rtol=1e-3)
    half = store.batch(["a"], ["ACD"], ["pair"], max_len=4, pair_dtype=torch.float16)["pair"]
    assert half.dtype == torch.float16 and half.shape == (1, 4, 4, 4)
    with pytest.raises(DataError, match="max_len"):
        store.batch(["b"], ["GHIKL"], ["single"], max_len=4)


def test_store_open_errors(tmp_path):
    with pytest.raises(DataError, match="index.json"):
        ProteinTargetStore(tmp_path / "none")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"index.json.*corrupt"):
        ProteinTargetStore(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="reed-protein-targets"):
        ProteinTargetStore(tmp_path)


# ---------------------------------------------------------------------------------------- standardisation


def test_masked_standardize_hand_computed():
    z = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [1e9, -1e9]],
                      [[5.0, 20.0], [7.0, 40.0], [float("inf"), float("nan")]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = masked_standardize(z, mask)
    # channel 0 over valid entries: 1,3,5,7 -> mean 4, population std sqrt(5); channel 1: 10,30,20,40 -> 25, sqrt(125)
    exp0 = (torch.tensor([1.0, 3.0, 5.0, 7.0]) - 4.0) / (5.0**0.5 + 1e-6)
    exp1 = (torch.tensor([10.0, 30.0, 20.0, 40.0]) - 25.0) / (125.0**0.5 + 1e-6)
    got = out[mask.bool()]
    torch.testing.assert_close(got[:, 0], exp0)
    torch.testing.assert_close(got[:, 1], exp1)
    assert torch.isfinite(out).all() and out[:, 2].abs().sum() == 0
    # padding content does not matter
    z2 = z.clone()
    z2[:, 2] = 0.0
    torch.testing.assert_close(masked_standardize(z2, mask), out)


def test_masked_standardize_edges():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 5, generator=g)
    mask = torch.ones(2, 4, 3)
    mask[1, 2:] = 0
    out = masked_standardize(z, mask)
    v = out[mask.bool()]
    torch.testing.assert_close(v.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    z_big = z.clone()
    z_big[1, 2:] = 1e6
    torch.testing.assert_close(masked_standardize(z_big, mask), out)
    with pytest.raises(ValueError):
        masked_standardize(z, mask[..., 0])


# ------------------------------------------------------------------------------------------------ ESM-2


@pytest.fixture(scope="module")
def tiny_esm(tmp_path_factory):
    return save_random_esm2(tmp_path_factory.mktemp("tiny_esm2"))


SEQS = ["MKTAYIAKQR", "GSHMLE", "ACDEFGHIKLMNPQRSTVWY", "MXJKL"]


def test_esm2_shapes_and_direct_call(tiny_esm):
    from transformers import AutoTokenizer, EsmModel

    outs = list(esm2_embeddings(SEQS, str(tiny_esm)))
    assert len(outs) == len(SEQS)
    for s, o in zip(SEQS, outs):
        L = len(s)
        assert o["single"].shape == (L, 16) and o["pair"].shape == (L, L, 4)
        np.testing.assert_allclose(o["pair"], o["pair"].transpose(1, 0, 2), atol=0)
    tok = AutoTokenizer.from_pretrained(str(tiny_esm))
    model = EsmModel.from_pretrained(str(tiny_esm), add_pooling_layer=False, attn_implementation="eager").eval()
    s = SEQS[0]
    L = len(s)
    ids = tok(s, return_tensors="pt")
    with torch.no_grad():
        ref = model(**ids, output_attentions=True)
    np.testing.assert_allclose(outs[0]["single"], ref.last_hidden_state[0, 1 : L + 1].numpy(), atol=1e-5)
    a = torch.stack(ref.attentions, 1)[0].flatten(0, 1)[:, 1 : L + 1, 1 : L + 1]  # (layers*heads, L, L)
    np.testing.assert_allclose(outs[0]["pair"], ((a + a.transpose(1, 2)) / 2).permute(1, 2, 0).numpy(), atol=1e-6)
    # 'X' and an unknown letter ('J') both map to X
    x_ids = tok("MXXKL", return_tensors="pt")
    with torch.no_grad():
        ref_x = model(**x_ids).last_hidden_state[0, 1:6].numpy()
    np.testing.assert_allclose(outs[3]["single"], ref_x, atol=1e-5)
    # an intermediate layer (0 = embeddings, 1 = first layer) and no pair maps
    (o1,) = esm2_embeddings([s], str(tiny_esm), layer=1, pair=None)
    assert set(o1) == {"single"} and o1["single"].shape == (L, 16)
    assert not np.allclose(o1["single"], outs[0]["single"])


def test_esm2_batching_matches_one_by_one(tiny_esm):
    batched = list(esm2_embeddings(SEQS, str(tiny_esm), batch_tokens=30))
    single = [next(esm2_embeddings([s], str(tiny_esm))) for s in SEQS]
    for b, o in zip(batched, single):
        np.testing.assert_allclose(b["single"], o["single"], atol=1e-5)
        np.testing.assert_allclose(b["pair"], o["pair"], atol=1e-5)


def test_esm2_missing_model(tmp_path):
    with pytest.raises(ReedError, match=r"nope.*local-dir"):
        list(esm2_embeddings(["ACD"], str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReedError, match="empty"):
        list(esm2_embeddings(["ACD"], str(tmp_path / "empty")))


def test_embed_proteins_esm2_resumable(tiny_esm, tmp_path):
    out = tmp_path / "esm_store"
    names = ["p1", "p2", "p3"]
    store = embed_proteins_esm2(names[:2], SEQS[:2], out, model=str(tiny_esm), progress=False)
    assert len(store) == 2 and store.dims == {"single": 16, "pair": 4}
    store = embed_proteins_esm2(names, SEQS[:3], out, model=str(tiny_esm), progress=False)
    assert len(store) == 3 and store.meta["model"] == str(tiny_esm)
    got = store.get("p3", SEQS[2], ["single", "pair"])
    (ref,) = esm2_embeddings([SEQS[2]], str(tiny_esm))
    np.testing.assert_allclose(got["single"], ref["single"], rtol=1e-3, atol=1e-3 * np.abs(ref["single"]).max())
    np.testing.assert_allclose(got["pair"], ref["pair"], rtol=1e-3, atol=1e-6)


# -------------------------------------------------------------------------------------------------- AF3


def _fake_af3(root, job, seq, rng, npad=32, data_json=True, drop_key=None):
    d = root / job / "seed-0_embeddings"
    d.mkdir(parents=True)
    arrays = {"single_embeddings": rng.standard_normal((npad, 384)).astype(np.float32),
              "pair_embeddings": rng.standard_normal((npad, npad, 128)).astype(np.float32),
              "structure_embeddings": (rng.standard_normal((npad, 768)) * 1e-2).astype(np.float32)}
    if drop_key:
        arrays.pop(drop_key)
    np.savez_compressed(d / "embeddings.npz", **arrays)
    if data_json:
        (root / job / f"{job}_data.json").write_text(
            json.dumps({"name": job, "sequences": [{"protein": {"id": "A", "sequence": seq}}]}))
    return arrays


def test_import_af3(tmp_path):
    rng = np.random.default_rng(3)
    af3 = tmp_path / "af3"
    s1, s2 = "MHHHHHHACDEFGHIKL", "GSWVKLT"
    a1 = _fake_af3(af3, "cluster_1", s1, rng)
    a2 = _fake_af3(af3, "cluster_2", s2, rng, data_json=False)
    assert read_af3_job_sequence(af3 / "cluster_1") == s1
    assert read_af3_job_sequence(af3 / "cluster_2") is None
    store = import_af3_embeddings(af3, tmp_path / "store", chains={"1abc_A": ("cluster_1", s1),
                                                                    "2def_B": ("cluster_2", s2)}, progress=False)
    assert store.dims == {"single": 384, "pair": 128, "structure": 768}
    L = len(s1)
    got = store.get("1abc_A", s1, ["single", "pair", "structure"])
    assert got["single"].shape == (L, 384) and got["pair"].shape == (L, L, 128) and got["structure"].shape == (L, 768)
    for k, key in [("single", "single_embeddings"), ("structure", "structure_embeddings")]:
        ref = a1[key][:L]
        np.testing.assert_allclose(got[k], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    np.testing.assert_allclose(got["pair"], a1["pair_embeddings"][:L, :L], rtol=1e-3, atol=5e-3)
    trimmed = store.get("1abc_A", s1[7:], ["structure"])["structure"]
    np.testing.assert_allclose(trimmed, got["structure"][7:], atol=0)
    g2 = store.get("2def_B", s2, ["pair"])["pair"]
    np.testing.assert_allclose(g2, a2["pair_embeddings"][:7, :7], rtol=1e-3, atol=5e-3)


def test_import_af3_missing(tmp_path):
    rng = np.random.default_rng(4)
    af3 = tmp_path / "af3"
    _fake_af3(af3, "cluster_1", "ACDEF", rng, npad=8)
    _fake_af3(af3, "cluster_3", "ACDEF", rng, npad=8, drop_key="pair_embeddings")
    _fake_af3(af3, "cluster_5", "ACDEF", rng, npad=8, data_json=False)
    (af3 / "cluster_4").mkdir()
    chains = {"ok": ("cluster_1", "ACDEF"), "gone": ("cluster_2", "ACDEF"), "nokey": ("cluster_3", "ACDEF"),
              "nofile": ("cluster_4", "ACDEF"), "otherseq": ("cluster_1", "ACDEW")}
    with pytest.raises(DataError) as e:
        import_af3_embeddings(af3, tmp_path / "store", chains=chains, progress=False)
    msg = str(e.value)
    assert "4 of 5" in msg and "cluster_2" in msg and "'gone'" in msg
    assert "pair_embeddings" in msg and "'nokey'" in msg
    assert "embeddings.npz not found" in msg and "'nofile'" in msg
    assert "'otherseq'" in msg and "folded" in msg and "'ok'" not in msg
    assert not list((tmp_path / "store" / "items").glob("*.npz"))  # nothing written before the check passes
    with pytest.raises(DataError, match="at least 9 tokens"):
        import_af3_embeddings(af3, tmp_path / "store2", chains={"long": ("cluster_5", "ACDEFGHIK")},
                              progress=False)
