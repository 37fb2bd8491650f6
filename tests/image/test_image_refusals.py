"""Table of bad inputs to the image commands: each is refused with exit code 2 and one line naming the argument,
key or file (issue 11, items 6-8), plus the checks behind them called directly (target values, guidance, scoring)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from reed.checkpoint import save_checkpoint
from reed.config import TargetConfig, dump_config, load_config
from reed.errors import ConfigError, DataError, ReedError
from reed.image.metrics.frechet import feature_stats
from reed.image.targets.prepare import validate_target

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Bad files of every kind, a good 40-image data set and a run directory whose checkpoint holds a config (with
    ``image.sample.guidance_high=0.7``) but no usable weights: every case must be refused before a model loads."""
    d = tmp_path_factory.mktemp("image_refusals")
    rng = np.random.default_rng(0)
    np.savez(d / "d.npz", images=rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8), labels=np.arange(40) % 4)
    np.savez(d / "empty.npz", images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros(0, np.int64))
    np.savez(d / "obj.npz", images=np.array([np.zeros((8, 8, 3), np.uint8)] * 4, dtype=object), labels=np.arange(4))
    (d / "pickle.npz").write_bytes(pickle.dumps({"images": np.zeros((4, 8, 8, 3), np.uint8)}))
    np.save(d / "z_obj.npy", np.array([None] * 40, dtype=object), allow_pickle=True)
    np.save(d / "z_tok12.npy", rng.standard_normal((40, 12, 8)).astype(np.float32))  # 12 tokens: no square grid
    np.save(d / "z_zero.npy", np.zeros((40, 12), np.float32))
    np.save(d / "z_huge.npy", np.full((40, 12), 1e20, np.float32))  # fp32 norm overflows: cosine would be 0

    cfg = load_config(DEMO, ["objective.method=sit", "image.sample.guidance_high=0.7", f"train.cache_dir={d / 'c'}"])
    w = {"x": torch.zeros(1)}
    save_checkpoint(d / "run", 1, model=w, ema=w, optimizer={"state": {}, "param_groups": []}, scheduler=None,
                    config_yaml=dump_config(cfg))
    digits = rng.integers(0, 255, (20, 8, 8, 1), dtype=np.uint8)  # the run's data: 8x8 grey digits, 10 classes
    np.savez(d / "float01.npz", arr_0=digits.astype(np.float32) / 255.0, arr_1=np.arange(20) % 10)
    np.savez(d / "labels_out.npz", arr_0=digits, arr_1=np.arange(20))  # classes 10..19 do not exist
    np.savez(d / "one.npz", arr_0=digits[:1], arr_1=np.zeros(1, np.int64))
    np.savez(d / "ok.npz", arr_0=digits, arr_1=np.arange(20) % 10)
    rgb = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(d / "rgb_float.npz", arr_0=rgb.astype(np.float32) / 255.0)
    np.savez(d / "rgb_one.npz", arr_0=rgb[:1])
    np.savez(d / "bad_json.npz", arr_0=digits)
    (d / "bad_json.json").write_text("{not json")
    return d


def _train(d: Path, *over: str) -> list:
    return ["train", DEMO, "image.data.name=npz", f"image.data.path={d / 'd.npz'}", "train.steps=1",
            "train.batch_size=8", "train.progress=false", "train.sample_every=0", f"train.cache_dir={d / 'c'}",
            *over, "--out", d / "out", "--overwrite"]


def _target(d: Path, file: str, kind: str) -> str:
    return f"targets=[{{name: feat, source: file, path: {d / file}, kind: {kind}, depth: 1, projector_dim: 16}}]"


# (id, argv builder: dir -> argv, what the error line must name)
CASES = [
    # item 6: sampling flags (checked with the run's image.sample values standing in for flags not given)
    ("cfg-scale-nan", lambda d: ["sample", d / "run", "--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
    ("cfg-scale-inf", lambda d: ["sample", d / "run", "--cfg-scale", "inf"], ["--cfg-scale", "finite"]),
    ("cfg-scale-below-one", lambda d: ["sample", d / "run", "--cfg-scale", "0.5"], ["--cfg-scale", ">= 1"]),
    ("guidance-low-above-high", lambda d: ["sample", d / "run", "--guidance-low", "0.9", "--guidance-high", "0.1"],
     ["--guidance-low", "--guidance-high", "empty"]),
    ("guidance-low-above-runs-high", lambda d: ["sample", d / "run", "--guidance-low", "0.8"],
     ["--guidance-low", "image.sample.guidance_high", "0.7"]),
    ("guidance-high-above-one", lambda d: ["sample", d / "run", "--guidance-high", "1.5"],
     ["--guidance-high", "[0, 1]"]),
    ("guidance-low-nan", lambda d: ["sample", d / "run", "--guidance-low", "nan"], ["--guidance-low"]),
    # item 10: the sampling protocol (checked before the model loads), item 12: import flags
    ("sample-protocol-unknown", lambda d: ["sample", d / "run", "--protocol", "bogus"],
     ["--protocol", "'bogus'", "reed, paper"]),
    ("sample-labels-contradict-paper", lambda d: ["sample", d / "run", "--protocol", "paper", "--labels", "balanced"],
     ["--labels balanced", "--protocol paper"]),
    ("config-sample-protocol", lambda d: ["show-config", DEMO, "image.sample.protocol=bogus"],
     ["image.sample.protocol", "bogus"]),
    ("import-target-store-form", lambda d: ["import", d / "none.pt", "--out", d / "o", "--target-store", "dinov2"],
     ["--target-store", "NAME=DIR"]),
    # item 6: data and target files
    ("data-empty", lambda d: _train(d, "targets=[]", f"image.data.path={d / 'empty.npz'}"), ["empty.npz", "empty"]),
    ("data-object-array", lambda d: _train(d, "targets=[]", f"image.data.path={d / 'obj.npz'}"),
     ["obj.npz", "pickled", "never loads"]),
    ("data-pickle", lambda d: _train(d, "targets=[]", f"image.data.path={d / 'pickle.npz'}"),
     ["pickle.npz", "pickled"]),
    ("target-object-array", lambda d: _train(d, _target(d, "z_obj.npy", "pooled")), ["z_obj.npy", "pickled"]),
    ("target-tokens-not-square", lambda d: _train(d, _target(d, "z_tok12.npy", "tokens")),
     ["'feat'", "12 tokens", "square"]),
    # item 8: target values
    ("target-all-zero", lambda d: _train(d, _target(d, "z_zero.npy", "pooled")), ["'feat'", "z_zero.npy", "zero"]),
    ("target-norm-overflows", lambda d: _train(d, _target(d, "z_huge.npy", "pooled")),
     ["'feat'", "z_huge.npy", "overflows"]),
    # items 6/7: scoring, in-domain (--run) and Inception (--ref) paths
    ("evaluate-batch-size-zero", lambda d: ["evaluate", d / "ok.npz", "--run", d / "run", "--batch-size", "0"],
     ["--batch-size"]),
    ("evaluate-float-samples-indomain", lambda d: ["evaluate", d / "float01.npz", "--run", d / "run"],
     ["float01.npz", "uint8 0..255", "float32"]),
    ("evaluate-float-samples-inception", lambda d: ["evaluate", d / "rgb_float.npz", "--ref", d / "rgb_float.npz"],
     ["rgb_float.npz", "uint8 0..255", "float32"]),
    ("evaluate-labels-out-of-range", lambda d: ["evaluate", d / "labels_out.npz", "--run", d / "run"],
     ["labels_out.npz", "class 10", "0..9"]),
    ("evaluate-one-sample-indomain", lambda d: ["evaluate", d / "one.npz", "--run", d / "run"],
     ["one.npz", "at least 2"]),
    ("evaluate-one-sample-inception", lambda d: ["evaluate", d / "rgb_one.npz", "--ref", d / "rgb_one.npz"],
     ["rgb_one.npz", "at least 2"]),
    ("evaluate-pickle-samples", lambda d: ["evaluate", d / "pickle.npz", "--run", d / "run"],
     ["pickle.npz", "pickled"]),
    ("evaluate-bad-settings-json", lambda d: ["evaluate", d / "bad_json.npz", "--run", d / "run"],
     ["bad_json.json", "JSON"]),
]


@pytest.mark.parametrize("build,names", [pytest.param(b, n, id=i) for i, b, n in CASES])
def test_image_bad_input_is_refused(env, refuses, build, names):
    refuses(build(env), *names)


# ------------------------------------------------------------------------------------------------ direct checks


def _tg(kind: str = "pooled") -> TargetConfig:
    return TargetConfig(name="feat", source="file", path="z.npy", kind=kind)


def test_some_zero_target_vectors_warn_with_count_and_still_load():
    z = torch.randn(40, 12)
    z[:3] = 0.0
    with pytest.warns(UserWarning, match=r"target 'feat' from z.npy: 3 of 40 target vectors have zero"):
        out = validate_target(_tg(), z, 40, "z.npy")
    assert out.shape == (40, 12)
    tok = torch.randn(4, 16, 8)
    tok[1, :5] = 0.0  # token targets count per token: 5 of 64 vectors
    with pytest.warns(UserWarning, match="5 of 64 target vectors"):
        validate_target(_tg("tokens"), tok, 4, "z.npy")


@pytest.mark.parametrize("value,match", [(1e-20, "all 40 target vectors have zero"), (1e19, "overflows"),
                                         (float("inf"), "NaN or inf")])
def test_target_values_the_cosine_cannot_use(value, match):
    z = torch.full((40, 12), value)
    with pytest.raises(DataError, match=rf"target 'feat' from z.npy.*{match}"):
        validate_target(_tg(), z, 40, "z.npy")
    ok = torch.full((40, 12), 1e17)  # large but its fp32 norm (~3.5e17) is finite: accepted, cosine exact
    assert torch.equal(validate_target(_tg(), ok, 40, "z.npy"), ok)


def test_store_writer_refuses_values_that_overflow_float16(tmp_path):
    from reed.store import TargetStoreWriter

    w = TargetStoreWriter(tmp_path / "s", source="enc", count=4, shape=(3,), dtype="float16", shard_size=4)
    with pytest.raises(DataError, match=r"'enc'.*up to 1e\+05.*float16.*--dtype float32"):
        w.write(lambda idx: torch.full((len(idx), 3), 1e5), progress=False)
    assert not list((tmp_path / "s").glob("z_*.npy"))  # nothing written
    w32 = TargetStoreWriter(tmp_path / "s32", source="enc", count=4, shape=(3,), dtype="float32", shard_size=4)
    w32.write(lambda idx: torch.full((len(idx), 3), 1e5), progress=False)  # fine as float32
    w32.finalize()


def test_store_open_checks_values(tmp_path):
    from reed.store import TargetStore, TargetStoreWriter

    def store(name: str, z: np.ndarray) -> Path:
        w = TargetStoreWriter(tmp_path / name, source="enc", count=len(z), shape=z.shape[1:], dtype="float32",
                              shard_size=4)
        w.write(lambda idx: z[idx], progress=False)
        w.finalize()
        return tmp_path / name

    with pytest.raises(DataError, match=r"target store .*zeros: all 10 target vectors have zero"):
        TargetStore(store("zeros", np.zeros((10, 3), np.float32)))
    some = np.ones((10, 3), np.float32)
    some[[2, 7]] = 0.0  # in two different shards: counted over the store
    with pytest.warns(UserWarning, match="2 of 10 target vectors"):
        assert len(TargetStore(store("some", some))) == 10


def test_guidance_config_keys_are_checked():
    for over, key in (("image.sample.cfg_scale=.nan", "image.sample.cfg_scale"),
                      ("image.sample.guidance_low=0.9", "image.sample.guidance_low"),
                      ("image.sample.guidance_high=-0.1", "image.sample.guidance_high")):
        over2 = [over, "image.sample.guidance_high=0.5"] if "low" in over else [over]
        with pytest.raises(ConfigError, match=key):
            load_config(DEMO, over2)
    cfg = load_config(DEMO, ["image.sample.cfg_scale=1.8", "image.sample.guidance_high=0.7"])
    assert (cfg.image.sample.cfg_scale, cfg.image.sample.guidance_high) == (1.8, 0.7)


def test_indomain_scoring_refuses_what_it_cannot_score():
    from reed.image.metrics.indomain import DomainClassifier, InDomainEvaluator

    ev = InDomainEvaluator(DomainClassifier(1, 4, width=4, feat_dim=8), torch.rand(10, 1, 8, 8) * 2 - 1, 0.5)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    with pytest.raises(DataError, match="at least 2 samples"):
        ev(x[:1])
    with pytest.raises(DataError, match="class 4, outside the evaluator's classes 0..3"):
        ev(x, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(DataError, match=r"N=6"):
        ev(x, torch.tensor([0, 1]))
    out = ev(x, torch.tensor([0, 1, 2, 3, 0, 1]))
    assert out["num_samples"] == 6 and 0.0 <= out["accuracy"] <= 1.0
    with pytest.raises(ReedError, match="N >= 2"):  # a DataError the CLI prints, not a bare ValueError
        feature_stats(np.zeros((1, 8)))
