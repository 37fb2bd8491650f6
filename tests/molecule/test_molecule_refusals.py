"""Bad input to the molecule commands: one case per class, each refused with exit code 2 and one error line that
names the bad file, flag or config key (the ``refuses`` fixture in tests/conftest.py). Nothing here trains."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QM9 = str(CONFIGS / "molecule_qm9_reed.yaml")


def _empty_sdf(d: Path) -> list:
    (d / "empty.sdf").write_text("")
    return ["evaluate", d / "empty.sdf"], ["empty.sdf", "no molecules to score", "empty"]


def _garbage_sdf(d: Path) -> list:
    (d / "garbage.sdf").write_bytes(b"\x00\x9f\x13 this is not a molecule file\n" * 20)
    return ["evaluate", d / "garbage.sdf"], ["garbage.sdf", "no molecules to score"]


def _unparseable_records(d: Path) -> list:
    (d / "bad.sdf").write_text("not a molfile\n  nothing\n\n  2  1  0  0\n$$$$\nnor this\n$$$$\n")
    return ["evaluate", d / "bad.sdf"], ["bad.sdf", "no molecules to score", "unreadable", "record 0"]


def _garbage_arrays(d: Path) -> list:
    (d / "s.sdf").write_text("")
    (d / "s.npz").write_bytes(b"PK\x03\x04 truncated zip")
    return ["evaluate", d / "s.sdf"], ["s.npz"]


def _empty_arrays(d: Path) -> list:
    from reed.molecule.dataset import MoleculeDataset

    (d / "e.sdf").write_text("")
    MoleculeDataset([], ["H", "C"], name="e").save(d / "e.npz")
    return ["evaluate", d / "e.sdf"], ["e.npz", "no molecules to score"]


def _missing_samples(d: Path) -> list:
    return ["evaluate", d / "nowhere.sdf"], ["nowhere.sdf", "not found"]


def _fake_run(d: Path, domain: str) -> Path:
    """A checkpoint directory with only a config (enough to route a command to its domain)."""
    run = d / f"{domain}_run"
    run.mkdir()
    (run / "state.json").write_text("{}")
    (run / "config.yaml").write_text(f"domain: {domain}\n")
    return run


def _methane_sdf(d: Path) -> Path:
    from reed.molecule.dataset import MoleculeDataset
    from reed.molecule.metrics import write_sdf

    write_sdf(MoleculeDataset.from_smiles(["C"]).molecules, d / "m.sdf")
    return d / "m.sdf"


def _run_of_other_domain(d: Path) -> list:
    run = _fake_run(d, "image")
    return ["evaluate", _methane_sdf(d), "--run", run], ["--run", str(run), "image run, not a molecule run"]


def _missing_run(d: Path) -> list:
    return ["evaluate", _methane_sdf(d), "--run", d / "no_run"], ["no_run"]


def _sample_num(d: Path) -> list:
    return ["sample", _fake_run(d, "molecule"), "--num", "0"], ["--num", "0"]


def _sample_steps(d: Path) -> list:
    return ["sample", _fake_run(d, "molecule"), "--steps", "-3"], ["--steps", "-3"]


def _sample_out_suffix(d: Path) -> list:
    return ["sample", _fake_run(d, "molecule"), "--out", d / "mols.png"], ["--out", "mols.png", ".sdf"]


def _config(*overrides: str, names: tuple[str, ...]):
    return lambda d: (["show-config", QM9, *overrides], list(names))


CASES = [
    pytest.param(_empty_sdf, id="evaluate-empty-sdf"),
    pytest.param(_garbage_sdf, id="evaluate-garbage-sdf"),
    pytest.param(_unparseable_records, id="evaluate-sdf-no-parseable-record"),
    pytest.param(_garbage_arrays, id="evaluate-garbage-npz-arrays"),
    pytest.param(_empty_arrays, id="evaluate-empty-npz-arrays"),
    pytest.param(_missing_samples, id="evaluate-missing-file"),
    pytest.param(_run_of_other_domain, id="evaluate-run-of-another-domain"),
    pytest.param(_missing_run, id="evaluate-missing-run"),
    pytest.param(_sample_num, id="sample-num-below-1"),
    pytest.param(_sample_steps, id="sample-steps-below-1"),
    pytest.param(_sample_out_suffix, id="sample-out-not-sdf"),
    pytest.param(_config("molecule.eval_num=0", names=("molecule.eval_num", "0")), id="config-eval-num-0"),
    pytest.param(_config("molecule.type_vocab=elements", names=("molecule.type_vocab", "elements")),
                 id="config-type-vocab"),
    pytest.param(_config("molecule.aromatic_rule=floor", names=("molecule.aromatic_rule", "floor")),
                 id="config-aromatic-rule"),
    pytest.param(_config("objective.method=sra", names=("objective.self_align", "sra", "molecule runs", "EMA model")),
                 id="config-self-alignment-not-for-molecules"),
    pytest.param(_config("molecule.data.conformers=lowest", names=("molecule.data.conformers", "lowest")),
                 id="config-conformers"),
    pytest.param(_config("molecule.curriculum_every=batch", names=("molecule.curriculum_every", "batch")),
                 id="config-curriculum-every"),
]


@pytest.mark.parametrize("make", CASES)
def test_molecule_commands_refuse_bad_input(make, refuses, tmp_path):
    argv, names = make(tmp_path)
    refuses(argv, *names)
