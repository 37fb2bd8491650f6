"""The house: the core names no domain, domains are registered objects, configs have one section per domain (the
old layout still loads), the CLI follows the domains, and a fourth domain trains through the unchanged trainer."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import reed
from reed import domains
from reed.config import Config, config_from_yaml_text, dump_config, load_config, to_dict
from reed.errors import ConfigError
from reed.loader import to_device

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(reed.__file__).parent
CORE = tuple(sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__"))  # every top-level module
DOMAIN_PACKAGES = ("reed.image", "reed.protein", "reed.molecule")


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def _domain_tests(path: Path) -> list[str]:
    """Comparisons of something named ``domain`` with a string constant (``cfg.domain == "protein"``)."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            names = [n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None)
                     for n in [node.left, *node.comparators]]
            consts = [n for n in [node.left, *node.comparators]
                      if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            if "domain" in names and consts:
                hits.append(ast.unparse(node))
    return hits


@pytest.mark.parametrize("module", CORE)
def test_core_module_names_no_domain(module):
    path = SRC / f"{module}.py"
    bad = [m for m in _imports(path) if m.startswith(DOMAIN_PACKAGES)]
    assert bad == [], f"reed.{module} imports {bad}"
    assert _domain_tests(path) == [], f"reed.{module} tests the domain by name"


def test_the_check_itself_catches_a_domain_import(tmp_path):
    """The inspection above is not vacuous: it sees function-local imports and domain-name tests."""
    f = tmp_path / "m.py"
    f.write_text("def g(cfg):\n    from reed.protein.task import X\n    return cfg.domain == 'protein'\n")
    assert "reed.protein.task" in _imports(f) and _domain_tests(f) == ["cfg.domain == 'protein'"]


def test_registry_and_protocol():
    assert domains.domain_names()[:3] == ["image", "protein", "molecule"]
    for name in ("image", "protein", "molecule"):
        spec = domains.get_domain(name)
        assert spec.name == name and dataclasses.is_dataclass(spec.config)
    assert domains.get_domain("protein").find_unused_parameters
    assert not domains.get_domain("image").find_unused_parameters
    with pytest.raises(ConfigError, match="unknown domain 'chemistry'.*image, protein, molecule"):
        domains.get_domain("chemistry")
    task = domains.get_task(load_config(ROOT / "configs" / "demo.yaml"))
    assert isinstance(task, domains.Domain)


def test_missing_extra_is_one_line():
    with pytest.raises(domains.MissingExtraError, match=r"needs no_such_pkg_xyz: pip install 'reed\[foo\]'"):
        domains.require_extra("foo", "foo", "no_such_pkg_xyz")
    domains.require_extra("image", "image", "torch")  # installed: no error


# --------------------------------------------------------------------------------------------------------------
# config sections


def test_new_and_old_layout_load_the_same(tmp_path, caplog):
    new = load_config(ROOT / "configs" / "demo.yaml")
    old_tree = {k: v for k, v in to_dict(new).items() if k not in ("image", "domain")} | to_dict(new)["image"]
    old = tmp_path / "old.yaml"
    import yaml

    old.write_text(yaml.safe_dump(old_tree))
    with caplog.at_level(logging.WARNING, logger="reed"):
        again = load_config(old)
    assert again == new
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "old layout" in notes[0] and "image:" in notes[0]
    assert list(to_dict(new))[:3] == ["seed", "domain", "image"]
    assert new.image is new.section and new.image.model.preset == "SiT-T/2"


def test_old_checkpoint_configs_of_every_domain_load():
    """Configs written by the old layout (image sections at the top, `protein: null`) upgrade silently."""
    fixture = ROOT / "tests" / "fixtures" / "old_layout_run" / "checkpoints" / "step_0000004" / "config.yaml"
    img = config_from_yaml_text(fixture.read_text())
    assert img.domain == "image" and img.image.model.depth == 2 and img.image.data.name == "digits"
    prot_old = {"domain": "protein", "data": {"name": "digits"}, "model": {"preset": "SiT-T/2"}, "fit": {"dim": 64},
                "protein": {"data": {"path": "x", "token_budget": 300}}, "molecule": None}
    import yaml

    prot = config_from_yaml_text(yaml.safe_dump(prot_old))
    assert prot.protein.data.token_budget == 300 and set(prot.sections) == {"protein"}
    mol_old = {"domain": "molecule", "fit": {"dim": 64, "width": 32, "steps": 7, "lr": 0.01, "batch_size": 3},
               "molecule": {"data": {"path": "x"}}, "protein": None}
    mol = config_from_yaml_text(yaml.safe_dump(mol_old))
    assert (mol.molecule.fit.width, mol.molecule.fit.steps, mol.molecule.fit.lr) == (32, 7, 0.01)


def test_section_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="has a 'protein' section but its domain is 'image'"):
        config_from_yaml_text("domain: image\nprotein: {data: {path: x}}\n")
    with pytest.raises(ConfigError, match="image.model.depht"):
        config_from_yaml_text("image: {model: {depht: 3}}\n")
    with pytest.raises(ConfigError, match="both an 'image' section and old top-level keys"):
        config_from_yaml_text("image: {model: {depth: 3}}\nmodel: {depth: 4}\n")
    with pytest.raises(ConfigError, match="targets.0.source.*protein runs take targets from 'protein_store'"):
        config_from_yaml_text("domain: protein\ntargets: [{name: a, source: caption_text}]\n")
    with pytest.raises(AttributeError, match="no 'protein' section"):
        _ = Config().protein


def test_legacy_override_is_applied_to_the_section(caplog):
    with caplog.at_level(logging.WARNING, logger="reed"):
        cfg = load_config(ROOT / "configs" / "demo.yaml", ["model.depth=3"])
    assert cfg.image.model.depth == 3
    assert any("deprecated override 'model.depth'" in r.getMessage() for r in caplog.records)


def test_every_shipped_config_uses_the_new_layout():
    import yaml

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        assert not {"data", "model", "process", "sample", "fit"} & set(tree), path.name
        assert tree.get("domain") in tree, path.name


# --------------------------------------------------------------------------------------------------------------
# CLI


def test_command_of_another_domain_is_one_line(capsys):
    from reed.cli import main

    assert main(["prepare-targets", str(ROOT / "configs" / "protein_reed.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image runs" in err[0] and "domain 'protein'" in err[0]
    assert main(["embed-protein", str(ROOT / "configs" / "demo.yaml"), "--out", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "protein runs" in err[0] and "domain 'image'" in err[0]


def test_fit_encoder_is_shared_by_image_and_molecule():
    from reed.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    handlers = sub.choices["fit-encoder"].get_default("handlers")
    assert set(handlers) == {"image", "molecule"}
    assert {"--structures", "--sampler", "--temperature"} <= set(sub.choices["sample"]._option_string_actions)


# --------------------------------------------------------------------------------------------------------------
# a fourth domain, written in this file and registered: the trainer runs it unchanged


@dataclasses.dataclass
class ToyConfig:
    points: int = 64
    width: int = 16


class ToyDenoiser(nn.Module):
    """Velocity net on (B,4,2) point sets with one tap (B,4,width)."""

    def __init__(self, width: int):
        super().__init__()
        self.hidden_size = width
        self.inp = nn.Linear(3, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x, t, cond, taps=()):
        h = torch.tanh(self.inp(torch.cat([x, t[:, None, None].expand(-1, x.shape[1], 1)], -1)))
        return self.out(h), {1: h}


class ToyTask:
    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, *, device, main_process_first, progress, world=1):
        g = torch.Generator().manual_seed(self.cfg.seed)
        self.x = torch.randn(self.cfg.toy.points, 4, 2, generator=g)
        self.z = self.x.flip(-1) * 2.0  # a target the hidden state can align to

        def load(terms):
            return None, {t.name: 2 for t in terms}

        self.cfg, _ = domains.resolve_targets(self.cfg, load)
        return self.cfg

    def build_denoiser(self):
        return ToyDenoiser(self.cfg.toy.width)

    def build_objective(self):
        from reed.processes.flow import FlowProcess

        return domains.build_objective(self.cfg, FlowProcess("linear"))

    def host_batches(self, step, rank, world):
        idx = torch.randint(0, len(self.x), (self.cfg.train.batch_size,), generator=torch.Generator().manual_seed(step))
        return [(self.x[idx], {t.name: self.z[idx] for t in domains.active_targets(self.cfg)})]

    def device_batch(self, host, device, generator):
        return to_device(host, device)

    def loss(self, objective, module, batch, step, generator):
        x, z = batch
        return objective(module, x, torch.zeros(len(x), dtype=torch.long), z, step, generator=generator)

    def eval_due(self, done):
        return False

    def evaluate(self, model, run_dir, step, device):
        return {}

    def title(self):
        return "toy"


def test_a_fourth_domain_trains_and_resumes(tmp_path):
    from reed.train import train

    spec = domains.DomainSpec(name="toy", config=ToyConfig, task=ToyTask,
                              denoiser=lambda cfg: ToyDenoiser(cfg.toy.width), target_sources=("toy_target",))
    domains.register_domain("toy", spec)
    try:
        text = ("domain: toy\ntoy: {points: 32, width: 8}\n"
                "targets: [{name: flip, source: toy_target, kind: tokens, depth: 1, projector_dim: 8}]\n"
                "train: {steps: 40, batch_size: 16, lr: 0.01, log_every: 1, checkpoint_every: 20, progress: false}\n")
        cfg = config_from_yaml_text(text)
        assert cfg.toy.points == 32 and dump_config(cfg).startswith("seed: 0\ndomain: toy\ntoy:")
        train(cfg, tmp_path / "a")
        train(cfg, tmp_path / "b", stop_at=20)
        train(cfg, tmp_path / "b", resume=True)
        rec = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
        resumed = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in rec] == [r["loss"] for r in resumed]
        first, last = sum(r["align/flip"] for r in rec[:5]) / 5, sum(r["align/flip"] for r in rec[-5:]) / 5
        assert last < first - 0.05  # the alignment of the toy domain's tap is learned
        model, loaded, _ = domains.load_denoiser(tmp_path / "a")
        assert isinstance(model, ToyDenoiser) and loaded.toy.width == 8
    finally:
        domains._REGISTRY.pop("toy", None)


def test_runtime_objects_are_built_from_their_config_sections():
    from reed.config import TargetConfig, build_from
    from reed.objective import AlignTerm, Curriculum

    t = TargetConfig(name="cap", source="caption_text", kind="pooled", depth=3, coeff=0.5, time_weight="cutoff",
                     cutoffs=[0.2, 0.7], modality="text", projector_dim=64, projector_layers=2, standardize=True)
    assert build_from(AlignTerm, t, dim=384, cutoffs=(0.2, 0.7)) == AlignTerm(
        name="cap", dim=384, depth=3, kind="pooled", coeff=0.5, time_weight="cutoff", cutoffs=(0.2, 0.7),
        modality="text", projector_dim=64, projector_layers=2, standardize=True)
    cfg = load_config(ROOT / "configs" / "protein_reed.yaml")
    cur = domains.curriculum(cfg, steps_per_unit=7)
    c = cfg.objective.curriculum
    assert isinstance(cur, Curriculum) and cur.steps_per_unit == (7 if c.unit == "epoch" else 1)
    assert (cur.gen_start, cur.gen_warmup, cur.gen_decay, cur.align_decay) == (c.gen_start, c.gen_warmup,
                                                                              c.gen_decay, c.align_decay)


def test_a_domain_without_its_extra_is_one_line(tmp_path):
    """Without biotite (simulated in a fresh interpreter) the protein commands and flags still exist and fail with
    one line naming the extra; the image commands still work."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['biotite'] = None\n"
            "from reed.cli import main\n"
            "assert main(['show-config', 'configs/demo.yaml']) == 0\n"
            "rcs = [main(['train', 'configs/protein_reed.yaml', 'protein.data.path=../shared/data/pdb',\n"
            f"              '--out', r'{tmp_path / 'run'}']),\n"
            f"       main(['embed-protein', 'configs/protein_reed.yaml', '--out', r'{tmp_path / 'store'}']),\n"
            f"       main(['evaluate', r'{tmp_path / 'designs.fasta'}', '--split', 'test'])]\n"
            "sys.exit(0 if rcs == [2, 2, 2] else 1)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    err = [ln for ln in res.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    want = "error: the protein domain needs biotite: pip install 'reed[protein]'"
    assert [ln.split(": ", 1)[1] for ln in err] == [want] * 3, err
    assert "domain: image" in res.stdout


def test_legacy_overrides_only_where_the_old_layout_had_them_and_domain_override():
    with pytest.raises(ConfigError, match="unknown config key 'data'"):
        load_config(ROOT / "configs" / "protein_reed.yaml", ["data.path=/x"])  # protein never had top-level data
    mol = load_config(ROOT / "configs" / "molecule_qm9_reed.yaml", ["fit.steps=7"])
    assert mol.molecule.fit.steps == 7
    switched = load_config(ROOT / "configs" / "demo.yaml", ["domain=protein", "targets=[]"])
    assert switched.domain == "protein" and set(switched.sections) == {"protein"}


def test_resume_lets_sampler_and_fitting_settings_change():
    from reed.train import config_differences, resume_config

    saved = load_config(ROOT / "configs" / "demo.yaml")
    now = load_config(ROOT / "configs" / "demo.yaml", ["image.sample.steps=9", "image.fit.steps=5",
                                                       "train.steps=3000"])
    assert config_differences(now, saved) == []
    merged = resume_config(now, saved)
    assert (merged.image.sample.steps, merged.image.fit.steps, merged.train.steps) == (9, 5, 3000)
    moved = load_config(ROOT / "configs" / "demo.yaml", ["image.model.depth=3"])
    assert [d.split(" ")[0] for d in config_differences(moved, saved)] == ["image.model.depth"]
