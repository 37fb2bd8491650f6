"""Generic I/O and runtime helpers shared by every domain: atomic file writes, progress bars, device choice, eval mode.

Atomic writes
-------------
Every file reed writes that another run, process or reader may look at is written through :func:`atomic_path`
(or one of the thin wrappers built on it): the content goes to a fresh temporary file in the target's directory,
which is flushed, ``fsync``-ed and then renamed onto the target with ``os.replace``. Guarantees:

* a reader of ``path`` sees either the previous complete file (or no file) or the new complete one, never a
  partial write, also when the writer is killed or raises midway;
* on any exception (``KeyboardInterrupt`` included) the temporary file is removed and ``path`` is left as it was;
* the temporary name is unique per process *and* per call (``.<name>.<pid>-<8 hex>.tmp``, created with
  ``O_EXCL``), so concurrent writers of the same path, in threads or processes, never share a temporary file: each
  rename is atomic and the last one wins, with one writer's complete content;
* the new file gets the usual permissions (``0o666`` minus the umask), like ``open(path, "w")``;
* the data is on disk before the rename (``fsync``); the directory itself is not synced, so after a power loss the
  target may still hold its previous version (never a torn one).

Parent directories are not created. A crash that kills the process between creating and renaming the temporary
file leaves it behind; :func:`is_temp_name` / :func:`stale_temps` recognise such leftovers (also the names that reed
versions before this module used: ``.<name>.tmp-<pid>`` and ``<name>.tmp<pid>``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch

__all__ = [
    "read_npz",
    "PICKLE_REFUSED",
    "TEMP_SUFFIX",
    "atomic_path",
    "atomic_save_npy",
    "atomic_save_safetensors",
    "atomic_savez",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "commit",
    "eval_mode",
    "file_sha256",
    "fingerprint",
    "is_pickle_refusal",
    "is_temp_name",
    "pick_device",
    "progress_bar",
    "stale_temps",
    "temp_file",
    "temp_name",
    "temp_target",
]

T = TypeVar("T")
M = TypeVar("M", bound=torch.nn.Module)

#: Suffix of every temporary file or directory name made by :func:`temp_name`.
TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.\d+-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$", re.DOTALL)
# names written by earlier reed versions: ".<name>.tmp-<pid>" and "<name>.tmp<pid>" (+ "b" for a second one)
_LEGACY_RE = re.compile(r"^\.?(?P<target>.+)\.tmp(-\d+|\d+b?)$", re.DOTALL)


# ------------------------------------------------------------------------------------------------ atomic writes


def temp_name(path: str | os.PathLike) -> Path:
    """A new temporary name beside ``path``: ``<dir>/.<name>.<pid>-<8 random hex>.tmp`` (nothing is created).

    Unique per process and per call with overwhelming probability; :func:`atomic_path` additionally creates the file
    with ``O_EXCL`` and draws again on a clash. Use it directly for a temporary *directory* renamed into place
    (``mkdir`` fails rather than reuse an existing one).
    """
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """True for a file name made by :func:`temp_name` or by the atomic writers of earlier reed versions."""
    return temp_target(name) is not None


def temp_target(name: str) -> str | None:
    """The target file name a temporary file name stands for (``".a.npy.12-0f3c9a1b.tmp"`` -> ``"a.npy"``), or
    None if ``name`` is not a temporary name (see :func:`is_temp_name`)."""
    m = _TEMP_RE.match(name) or _LEGACY_RE.match(name)
    return m.group("target") if m else None


def stale_temps(directory: str | os.PathLike, target_glob: str = "*") -> list[Path]:
    """Temporary files (or directories) left in ``directory`` by interrupted atomic writes, sorted, whose target
    name matches ``target_glob`` (``fnmatch``; e.g. ``"*_00003.*"``). Includes the temps of writes still running in
    other processes: only remove them when no other writer can be active."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        target = temp_target(p.name)
        if target is not None and fnmatch.fnmatchcase(target, target_glob):
            out.append(p)
    return sorted(out)


def _create_temp(path: Path) -> Path:
    for _ in range(100):
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a unique temporary file beside {path}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def temp_file(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a fresh, empty temporary file beside ``path`` (unique name, see :func:`temp_name`)
    that is removed when the block exits, however it exits, unless :func:`commit` has renamed it by then."""
    tmp = _create_temp(Path(path))
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """``fsync`` the finished temporary file ``tmp`` and rename it onto ``path`` (``os.replace``, atomic)."""
    _fsync(Path(tmp))
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a fresh, empty temporary file beside ``path`` to write by name (memory maps,
    libraries that take a file name); on a normal exit it is fsync-ed and renamed onto ``path``, on an exception
    removed (``path`` untouched). See the module docstring for the guarantees."""
    with temp_file(path) as tmp:
        yield tmp
        commit(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills the binary file object ``f`` (a temporary file), which then
    replaces ``path``. If ``write`` raises, ``path`` keeps its old content and no temporary file is left."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text`` (encoded with ``encoding``; newlines written as given)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, **json_kw: Any) -> None:
    """Atomically replace ``path`` with ``json.dumps(obj, **json_kw)`` plus a final newline (UTF-8)."""
    atomic_write_text(path, json.dumps(obj, **json_kw) + "\n")


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray, *, allow_pickle: bool = False) -> None:
    """Atomically write ``arr`` as a ``.npy`` file at exactly ``path`` (no ``.npy`` suffix is appended)."""
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=allow_pickle))


def atomic_savez(path: str | os.PathLike, arrays: Mapping[str, Any], *, compressed: bool = False) -> None:
    """Atomically write ``arrays`` as an ``.npz`` archive at exactly ``path`` (``np.savez`` or, with
    ``compressed``, ``np.savez_compressed``; no suffix is appended)."""
    save = np.savez_compressed if compressed else np.savez
    atomic_write(path, lambda f: save(f, **arrays))


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write ``tensors`` (contiguous, on any device) as a safetensors file with optional string
    ``metadata``. Written by name into the temporary file, so the data is not held twice in memory."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)


# ------------------------------------------------------------------------------------------------ runtime helpers


def read_npz(path: str | os.PathLike, what: str, required: Iterable[str] = (),
             keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (only ``keys`` when given; no pickles) as a dict. A missing file, a missing
    ``required`` key or an unreadable file raises one DataError naming the file and ``what`` it should be."""
    from reed.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in required if k not in z.files]
            if missing:
                raise DataError(f"{path}: not a {what}, missing key(s) {missing}")
            return {k: z[k] for k in (z.files if keys is None else keys)}
    except DataError:
        raise
    except Exception as exc:
        if is_pickle_refusal(exc):
            raise DataError(f"{path}: {what} {PICKLE_REFUSED}") from None
        raise DataError(f"{path}: cannot read {what} ({exc})") from exc


#: The end of the message for a file that needs unpickling (a pickle, or an ``.npy`` / ``.npz`` member of dtype
#: ``object``): reed never unpickles data files.
PICKLE_REFUSED = ("holds pickled Python objects (a pickle, or an array of dtype=object), which reed never loads: "
                  "save plain numeric arrays (strings as a fixed-width str array, np.array(list_of_str))")


def is_pickle_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is numpy's refusal to unpickle (``np.load(..., allow_pickle=False)`` on a pickle file or an
    object array; or memory-mapping an object array)."""
    msg = str(exc)
    return isinstance(exc, ValueError) and ("allow_pickle" in msg or "Python objects in dtype" in msg)


def progress_bar(items: Iterable[T], enabled: bool, desc: str, total: int | None = None, **tqdm_kw: Any
                 ) -> Iterable[T]:
    """``items`` wrapped in a ``tqdm.auto`` bar labelled ``desc`` when ``enabled``, else ``items`` unchanged.

    ``total`` (and any other ``tqdm`` keyword, e.g. ``leave=False``, ``unit="batch"``) is passed to tqdm; use it
    for iterators without a length.
    """
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, **tqdm_kw)


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``torch.device(name)``; ``None``, ``""`` and ``"auto"`` mean ``cuda`` if available, else ``cpu``."""
    if name is None or (isinstance(name, str) and name in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def eval_mode(module: M) -> Iterator[M]:
    """Put ``module`` in eval mode for the block and restore its previous training flag afterwards (also on an
    exception). Like ``was = m.training; m.eval(); ...; m.train(was)``: the restored flag is set on every
    submodule."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short (16 hex) sha256 over ``parts``: arrays and tensors (dtype, shape and bytes), strings, bytes, numbers,
    and (nested) lists/tuples of them. Identifies a data set in checkpoints and caches."""
    import hashlib

    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous().numpy()
        if isinstance(x, np.ndarray):
            x = np.ascontiguousarray(x)
            h.update(f"{x.dtype.str}{x.shape}".encode())
            h.update(x.tobytes())
        elif isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            for v in x:
                feed(v)
            h.update(b"]")
        elif isinstance(x, bytes):
            h.update(x)
        else:
            h.update(repr(x).encode())
        h.update(b"|")

    for p in parts:
        feed(p)
    return h.hexdigest()[:16]
