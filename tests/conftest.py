"""Shared test settings: offline hub, few threads, deterministic defaults."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)
torch.set_flush_denormal(True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real PDB files and QM9 molecules); CI provides it."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"shared data directory not found at {SHARED_DATA} (expected ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    """One ``train.cache_dir`` for the test modules that evaluate digits runs in-domain: the digits evaluator (an
    800-step classifier) is fitted once per session instead of once per module."""
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="session")
def pdb_dir(shared_data: Path) -> Path:
    return shared_data / "pdb"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny networks: on a busy 2-core machine two threads are several times
    slower. Use from a module's autouse fixture; the previous count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``reed.cli.main(argv)`` -> (exit code, stdout, stderr)."""
    from reed.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def refuses(capsys):
    """``refuses(argv, *names)``: the ``reed`` command ``argv`` exits with code 2 and prints exactly one error line
    (no traceback) that contains each of ``names`` (the bad argument, key or file). Returns that line.

    The building block of the table-driven refusal modules (``tests/<domain>/test_<domain>_refusals.py``): one
    case per class of bad input."""

    def check(argv: list, *names: str) -> str:
        rc, _, err = run_cli(argv, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip() and "warn" not in ln.lower()]
        assert rc == 2, f"exit code {rc}, stderr: {err}"
        assert len(lines) == 1 and "Traceback" not in err, f"not one line: {err}"
        for n in names:
            assert str(n) in lines[0], f"{n!r} not named in: {lines[0]}"
        return lines[0]

    return check
