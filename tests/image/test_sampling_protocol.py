"""`reed sample --protocol`: ``paper`` samples as the reference generate.py (uniform random labels, pixels truncated
to uint8, sd-vae-ft-ema), ``reed`` keeps class-balanced labels and rounding; the run's ``image.sample.protocol`` is
the default, the flag overrides it, and the JSON record says which protocol made the samples."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reed.cli import main
from reed.config import load_config
from reed.image.data import to_uint8
from reed.image.generate import generate
from reed.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """A 2-step pixel-space digits run whose config says ``image.sample.protocol: paper``."""
    d = tmp_path_factory.mktemp("proto")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["objective.method=sit", "train.steps=2", "train.batch_size=16",
                                                       "train.progress=false", "image.sample.protocol=paper",
                                                       "train.sample_every=0", "image.sample.steps=2",
                                                       f"train.cache_dir={d / 'c'}"])
    train(cfg, d / "run")
    return d / "run"


def test_uint8_truncation_vs_rounding_by_hand():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.5]).view(1, 1, 1, 7)  # (N,C,H,W)
    v = (x.clamp(-1, 1) + 1) * 127.5  # 0, 0.1275, 127.5, 191.25, 254.87, 255, 255
    assert to_uint8(x, truncate=True).ravel().tolist() == [0, 0, 127, 191, 254, 255, 255]
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 191, 255, 255, 255]
    assert torch.equal(torch.from_numpy(to_uint8(x, truncate=True)).ravel(), v.floor().to(torch.uint8).ravel())


def test_paper_protocol_from_config_random_labels_and_truncation(paper_run, tmp_path):
    kw = dict(num=20, batch_size=8, steps=2, seed=3, progress=False)
    paper = generate(paper_run, out=tmp_path / "p.npz", **kw)  # the run's config says paper
    assert (paper["protocol"], paper["labels"], paper["uint8"]) == ("paper", "random", "truncate")
    assert json.loads((tmp_path / "p.json").read_text())["protocol"] == "paper"
    p = np.load(tmp_path / "p.npz")
    want = torch.randint(0, 10, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    assert p["arr_1"].tolist() == want and p["arr_1"].tolist() != [i % 10 for i in range(20)]
    # same noise and labels under the reed protocol: the images differ only by rounding (0 or +1 grey level)
    reed = generate(paper_run, out=tmp_path / "r.npz", protocol="reed", labels="random", **kw)
    assert (reed["protocol"], reed["uint8"]) == ("reed", "round")
    r = np.load(tmp_path / "r.npz")
    assert np.array_equal(r["arr_1"], p["arr_1"])
    diff = r["arr_0"].astype(int) - p["arr_0"].astype(int)
    assert set(np.unique(diff).tolist()) == {0, 1}


def test_protocol_flag_overrides_config(paper_run, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(paper_run), "--protocol", "reed", "--num", "12", "--steps", "2", "--out",
                 str(out)]) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    assert (rec["protocol"], rec["labels"], rec["uint8"]) == ("reed", "balanced", "round")
    assert np.load(out)["arr_1"].tolist() == [i % 10 for i in range(12)]
