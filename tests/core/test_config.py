import pytest

from reed.config import Config, apply_overrides, config_from_yaml_text, dump_config, load_config
from reed.errors import ConfigError

DEMO = "configs/demo.yaml"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_demo_config_loads_with_overrides():
    cfg = load_config(DEMO, ["train.steps=200", "image.model.depth=4", "targets.1.coeff=0.25", "objective.method=repa",
                             "train.betas=[0.9, 0.95]"])
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 200 and cfg.image.model.depth == 4
    assert cfg.targets[1].coeff == 0.25 and isinstance(cfg.targets[1].coeff, float)
    assert cfg.objective.method == "repa" and cfg.train.betas == [0.9, 0.95]
    assert cfg.targets[0].kind == "tokens" and cfg.targets[1].kind == "pooled"


def test_round_trip_through_yaml():
    cfg = load_config(DEMO, ["train.lr=0.0003"])
    again = config_from_yaml_text(dump_config(cfg))
    assert again == cfg


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=5", "train.stepz"),
    ("modle.depth=3", "modle"),
    ("targets.5.coeff=1", "targets.5"),
    ("targets.0.colour=1", "targets.0.colour"),
])
def test_unknown_keys_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(DEMO, [override])


@pytest.mark.parametrize("override,needle", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("image.model.qk_norm=3", "model.qk_norm"),
    ("objective.method=dit", "objective.method"),
    ("targets.0.kind=grid", "targets.0.kind"),
    ("train.lr=fast", "train.lr"),
])
def test_wrong_types_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(DEMO, [override])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(DEMO, ["train.batch_size=10", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="targets.0.cutoffs"):
        load_config(DEMO, ["targets.0.cutoffs=[0.8, 0.2]"])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(DEMO, ["train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides(Config(), ["train.steps"])


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match="train.stpes"):
        load_config(typo)


def test_scientific_notation_override_without_dot():
    """YAML 1.1 reads "1e-3" as a string; a float field still takes it, a non-number is still refused."""
    from reed.config import load_config
    from reed.errors import ConfigError

    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    assert load_config(None, ["train.weight_decay=2E+2"]).train.weight_decay == 200.0
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=1e-3x"])
