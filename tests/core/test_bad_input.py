"""Bad input gets one clear error naming the thing that is wrong."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reed.checkpoint import load_weights, resolve_checkpoint, save_checkpoint
from reed.cli import main
from reed.config import TargetConfig, load_config
from reed.errors import CheckpointError, DataError
from reed.image.data import ImageDataset, batch_indices, load_dataset
from reed.image.targets.prepare import load_array, prepare_targets, validate_target
from reed.train import train

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def tiny_npz(path: Path, n: int = 40, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), labels=np.arange(n) % 4)
    return path


def file_target_cfg(tmp_path, z: np.ndarray, *extra):
    np.save(tmp_path / "z.npy", z)
    data = tiny_npz(tmp_path / "d.npz")
    return load_config(DEMO, ["image.data.name=npz", f"image.data.path={data}", "targets=[]", "train.steps=3",
                              "train.batch_size=8", "train.progress=false", f"train.cache_dir={tmp_path / 'c'}",
                              *extra]), data


def with_file_target(cfg, tmp_path, **kw):
    from dataclasses import replace

    tg = TargetConfig(name="feat", source="file", path=str(tmp_path / "z.npy"), projector_dim=16, **kw)
    return replace(cfg, targets=[tg])


def test_npz_dataset_with_file_target_trains(tmp_path):
    cfg, _ = file_target_cfg(tmp_path, np.random.randn(40, 16, 12).astype(np.float32))
    cfg = with_file_target(cfg, tmp_path, kind="tokens", depth=1)
    res = train(cfg, tmp_path / "run")
    assert res.step == 3
    ds = load_dataset(cfg.image.data)
    assert ds.shape == (3, 8, 8) and ds.num_classes == 4
    assert ds.images.min() >= -1 and ds.images.max() <= 1


def test_wrong_target_dimension(tmp_path):
    cfg, _ = file_target_cfg(tmp_path, np.random.randn(40, 16, 12).astype(np.float32))
    cfg = with_file_target(cfg, tmp_path, kind="tokens", dim=32)
    with pytest.raises(DataError, match=r"target 'feat'.*dimension 12.*dim=32"):
        train(cfg, tmp_path / "run")


def test_target_layout_mismatch(tmp_path):
    cfg, _ = file_target_cfg(tmp_path, np.random.randn(40, 12).astype(np.float32))
    cfg = with_file_target(cfg, tmp_path, kind="tokens")
    with pytest.raises(DataError, match=r"target 'feat'.*\(40, 12\).*kind 'tokens' needs \(N,T,D\)"):
        train(cfg, tmp_path / "run")


def test_target_dataset_length_mismatch(tmp_path):
    cfg, _ = file_target_cfg(tmp_path, np.random.randn(39, 12).astype(np.float32))
    cfg = with_file_target(cfg, tmp_path, kind="pooled")
    with pytest.raises(DataError, match=r"target 'feat'.*39 rows.*40 examples"):
        train(cfg, tmp_path / "run")


def test_target_with_nan(tmp_path):
    z = np.random.randn(40, 12).astype(np.float32)
    z[3, 1] = np.nan
    tg = TargetConfig(name="feat", source="file", path="x", kind="pooled")
    with pytest.raises(DataError, match="NaN"):
        validate_target(tg, torch.from_numpy(z), 40, "z.npy")


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="target file not found: .*nothere.npy"):
        load_array(tmp_path / "nothere.npy")
    with pytest.raises(DataError, match="data file not found: .*nodata.npz"):
        load_dataset(load_config(DEMO, ["image.data.name=npz",
                                        f"image.data.path={tmp_path / 'nodata.npz'}"]).image.data)
    ds = ImageDataset("x", torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 1)
    tg = TargetConfig(name="ssl", source="fitted_encoder", path=str(tmp_path / "no-encoder"))
    with pytest.raises(DataError, match=r"target 'ssl'.*no-encoder.*reed fit-encoder"):
        prepare_targets([tg], ds, tmp_path / "cache")


def test_corrupt_files(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match="bad.npy"):
        load_array(tmp_path / "bad.npy")
    (tmp_path / "bad.npz").write_bytes(b"PK garbage")
    with pytest.raises(DataError, match="bad.npz"):
        load_dataset(load_config(DEMO, ["image.data.name=npz", f"image.data.path={tmp_path / 'bad.npz'}"]).image.data)
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="no 'labels'"):
        load_dataset(load_config(DEMO, ["image.data.name=npz",
                                        f"image.data.path={tmp_path / 'nolabels.npz'}"]).image.data)


def test_batch_larger_than_dataset():
    with pytest.raises(DataError, match="batch_size .*larger than the data set"):
        batch_indices(0, 10, 64, 0)


def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    w = {"a": torch.ones(2)}
    ck = save_checkpoint(tmp_path, 5, model=w, ema=w, optimizer={"state": {}, "param_groups": []}, scheduler=None,
                         config_yaml="seed: 0\n")
    assert resolve_checkpoint(tmp_path) == ck
    assert torch.equal(load_weights(ck, "model")["a"], torch.ones(2))
    (ck / "ema.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        load_weights(ck, "ema")
    rc = main(["sample", str(tmp_path), "--num", "2", "--out", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "ema.safetensors" in err and "corrupt" in err
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: .*model.safetensors"):
        load_weights(ck, "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found in .*empty"):
        resolve_checkpoint(tmp_path / "empty")


def test_checkpoint_weights_mismatch_is_named(tmp_path):
    from reed.checkpoint import load_into

    save_file({"weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"w.safetensors.*missing \['bias'\].*weight: \(3, 3\) vs model \(2, 3\)"):
        load_into(torch.nn.Linear(3, 2), {"weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))


def test_cli_config_typo_exit_code(capsys):
    rc = main(["train", str(DEMO), "train.stpes=3"])
    assert rc == 2
    assert "train.stpes" in capsys.readouterr().err


def test_target_depth_beyond_model(tmp_path):
    cfg, _ = file_target_cfg(tmp_path, np.random.randn(40, 12).astype(np.float32))
    cfg = with_file_target(cfg, tmp_path, kind="pooled", depth=9)
    with pytest.raises(Exception, match=r"targets.0.depth.*9.*4 blocks"):
        train(cfg, tmp_path / "run")
