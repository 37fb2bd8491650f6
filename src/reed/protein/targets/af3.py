"""AlphaFold3 protein targets: trunk single / pair and diffusion-head structure activations of AF3 runs in the
reference layout, imported into a protein target store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from reed.errors import DataError
from reed.io import progress_bar
from reed.protein.targets.store import ProteinTargetStore, ProteinTargetWriter, short_sequence

AF3_KEYS = {"single": "single_embeddings", "pair": "pair_embeddings", "structure": "structure_embeddings"}
AF3_EMBEDDINGS = Path("seed-0_embeddings") / "embeddings.npz"


def _af3_sanitised(job: str) -> str:
    """AF3's output folder name for a job name (lower case, spaces to '_', only [a-z0-9_.-] kept)."""
    return "".join(c for c in job.lower().replace(" ", "_") if c.isalnum() or c in "_-.")


def _af3_job_dir(af3_dir: Path, job: str) -> Path:
    p = af3_dir / job
    if not p.is_dir():
        alt = af3_dir / _af3_sanitised(job)
        if alt.is_dir():
            return alt
    return p


def read_af3_job_sequence(job_dir: str | os.PathLike) -> str | None:
    """The first protein sequence AF3 folded in ``job_dir`` (from ``{job}/{job}_data.json``:
    ``sequences[0].protein.sequence``), or None when that file or field is absent. Unreadable JSON raises
    :class:`DataError` naming the file."""
    job_dir = Path(job_dir)
    path = job_dir / f"{job_dir.name}_data.json"
    if not path.is_file():
        found = sorted(job_dir.glob("*_data.json")) if job_dir.is_dir() else []
        if len(found) != 1:
            return None
        path = found[0]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read AF3 job data {path}: {e}") from e
    try:
        seq = data["sequences"][0]["protein"]["sequence"]
    except (KeyError, IndexError, TypeError):
        return None
    return seq if isinstance(seq, str) else None


def import_af3_embeddings(af3_dir: str | os.PathLike, out: str | os.PathLike, *,
                          chains: dict[str, tuple[str, str]], progress: bool = True) -> ProteinTargetStore:
    """Import AF3 embeddings (reference layout ``af3_dir/{job}/seed-0_embeddings/embeddings.npz`` with
    ``single_embeddings`` (Npad, 384), ``pair_embeddings`` (Npad, Npad, 128), ``structure_embeddings`` (Npad, 768))
    into a store at ``out``. ``chains`` maps our example name -> (AF3 job name, the sequence AF3 folded); each is
    stored under the example name with kinds single/pair/structure sliced to the folded length (dropping the AF3
    bucket padding), together with the folded sequence. Training looks items up with the example's own sequence,
    which must equal the folded one or occur once inside it (:meth:`ProteinTargetStore.get`).

    Every job is checked first: a missing job folder, embeddings file or key, a bucket shorter than the folded
    sequence, or a folded sequence that differs from the one in the job's ``{job}_data.json`` is collected, and one
    :class:`DataError` lists them (up to 10) before anything is written. Names already in ``out`` are skipped."""
    af3_dir = Path(af3_dir)
    if not af3_dir.is_dir():
        raise DataError(f"AF3 output directory not found: {af3_dir}")
    writer = ProteinTargetWriter(out, meta={"source": "af3", "af3_dir": str(af3_dir)})
    todo = [n for n in chains if not writer.has(n)]
    problems: list[str] = []
    plan: list[tuple[str, str, Path]] = []
    for name in todo:
        entry = chains[name]
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            problems.append(f"'{name}': expected (job name, folded sequence), got {entry!r}"[:200])
            continue
        job, seq = entry
        if not seq:
            problems.append(f"'{name}' (job {job}): empty folded sequence")
            continue
        job_dir = _af3_job_dir(af3_dir, job)
        path = job_dir / AF3_EMBEDDINGS
        if not job_dir.is_dir():
            problems.append(f"'{name}': AF3 job folder {job_dir} not found")
            continue
        if not path.is_file():
            problems.append(f"'{name}': AF3 embeddings file {path} not found")
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
        except (OSError, ValueError, EOFError) as e:
            problems.append(f"'{name}': cannot read {path}: {e}")
            continue
        missing = [k for k in AF3_KEYS.values() if k not in files]
        if missing:
            problems.append(f"'{name}': {path} lacks key(s) {missing}")
            continue
        folded = read_af3_job_sequence(job_dir)
        if folded is not None and folded != seq:
            problems.append(f"'{name}': job {job} folded {short_sequence(folded, 40)} but chains gives "
                            f"{short_sequence(seq, 40)}")
            continue
        plan.append((name, seq, path))
    if problems:
        writer.close()
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} of {len(todo)} AF3 jobs in {af3_dir} are missing or unusable:\n  "
                        + "\n  ".join(problems[:10]) + more)
    try:
        for name, seq, path in progress_bar(plan, progress, "AF3 embeddings"):
            writer.add(name, seq, _read_af3(path, name, len(seq)))
    finally:
        writer.close()
    return ProteinTargetStore(out)


def _read_af3(path: Path, name: str, L: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as z:
        for kind, key in AF3_KEYS.items():
            a = z[key]
            want = 3 if kind == "pair" else 2
            if a.ndim != want or a.shape[0] < L or (want == 3 and a.shape[1] < L):
                raise DataError(f"AF3 embeddings {path} ('{name}'): '{key}' has shape {list(a.shape)}, expected "
                                f"{want}-D with at least {L} tokens (the folded sequence length)")
            arrays[kind] = np.ascontiguousarray(a[:L, :L] if want == 3 else a[:L])
    return arrays

