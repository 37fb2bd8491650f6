"""reed.io: atomic writes (content, failure, concurrency, temp names), progress bar, device choice, eval mode."""

from __future__ import annotations

import io
import json
import os
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reed.io import (
    atomic_path,
    atomic_save_npy,
    atomic_save_safetensors,
    atomic_savez,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    commit,
    eval_mode,
    is_temp_name,
    pick_device,
    progress_bar,
    stale_temps,
    temp_file,
    temp_name,
    temp_target,
)


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_writers_produce_exact_content(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\nworld\n")
    assert (tmp_path / "a.txt").read_bytes() == "héllo\nworld\n".encode()
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01\xff"
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2]}, indent=1)
    assert (tmp_path / "c.json").read_text() == json.dumps({"x": [1, 2]}, indent=1) + "\n"
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    atomic_save_npy(tmp_path / "d.bin", arr)  # exactly this name: np.save must not append ".npy"
    np.testing.assert_array_equal(np.load(tmp_path / "d.bin"), arr)
    atomic_savez(tmp_path / "e.data", {"a": arr, "b": np.array([1.5])})
    with np.load(tmp_path / "e.data") as z:
        np.testing.assert_array_equal(z["a"], arr)
        assert z["b"].tolist() == [1.5]
    t = torch.randn(5, 3)
    atomic_save_safetensors(tmp_path / "f.safetensors", {"w": t}, metadata={"kind": "test"})
    assert torch.equal(load_file(str(tmp_path / "f.safetensors"))["w"], t)
    assert _names(tmp_path) == ["a.txt", "b.bin", "c.json", "d.bin", "e.data", "f.safetensors"]


def test_replacing_keeps_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "p.txt", "x")
        (tmp_path / "ref.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "p.txt").stat().st_mode & 0o777 == (tmp_path / "ref.txt").stat().st_mode & 0o777 == 0o644


def test_failing_writer_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old content")

    def bad(f):
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, bad)
    assert target.read_bytes() == b"old content"
    assert _names(tmp_path) == ["data.bin"]
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:  # also for BaseException
        tmp.write_bytes(b"new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old content"
    assert _names(tmp_path) == ["data.bin"]
    with pytest.raises(ValueError, match="allow_pickle"):  # np.save refuses an object array midway
        atomic_save_npy(target, np.array([{"a": 1}], dtype=object))
    assert target.read_bytes() == b"old content"
    assert _names(tmp_path) == ["data.bin"]


def test_concurrent_writers_end_with_one_complete_content(tmp_path):
    target = tmp_path / "shared.bin"
    n_threads, size = 8, 1 << 20
    payloads = [bytes([k]) * size for k in range(n_threads)]
    start = threading.Barrier(n_threads)
    errors = []

    def work(k):
        try:
            start.wait()
            for _ in range(5):
                # several writes per call, to make the writers interleave inside one file's lifetime
                atomic_write(target, lambda f: [f.write(payloads[k][i : i + 65536]) for i in range(0, size, 65536)])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = target.read_bytes()
    assert data in payloads  # one writer's complete content, not a mix
    assert _names(tmp_path) == ["shared.bin"]


def test_temp_names_are_unique_and_recognised(tmp_path):
    target = tmp_path / "z_00003.npy"
    names = {temp_name(target) for _ in range(2000)}
    assert len(names) == 2000
    for n in list(names)[:5]:
        assert n.parent == tmp_path and n.name.startswith(".z_00003.npy.") and n.name.endswith(".tmp")
        assert f".{os.getpid()}-" in n.name
        assert is_temp_name(n.name) and temp_target(n.name) == "z_00003.npy"
    with temp_file(target) as a, temp_file(target) as b:
        assert a != b and a.is_file() and b.is_file()
        seen = stale_temps(tmp_path, "*_00003.*")
        assert seen == sorted([a, b])
    assert not a.exists() and not b.exists()  # removed on exit when not committed
    with temp_file(target) as c:
        c.write_bytes(b"done")
        commit(c, target)
    assert target.read_bytes() == b"done" and _names(tmp_path) == ["z_00003.npy"]


def test_stale_temps_patterns_and_legacy_names(tmp_path):
    for name in [".z_00003.npy.tmp-1", "labels_00002.npy.tmp12345", "images_00002.npy.tmp12345b",
                 temp_name(tmp_path / "sources_00002.txt").name, "z_00003.npy", "notes.tmp.txt", ".hidden"]:
        (tmp_path / name).write_bytes(b"x")
    assert temp_target(".z_00003.npy.tmp-1") == "z_00003.npy"
    assert temp_target("labels_00002.npy.tmp12345") == "labels_00002.npy"
    assert not is_temp_name("z_00003.npy") and not is_temp_name("notes.tmp.txt") and not is_temp_name(".hidden")
    got = [p.name for p in stale_temps(tmp_path, "*_00002.*")]
    assert len(got) == 3 and "labels_00002.npy.tmp12345" in got and "images_00002.npy.tmp12345b" in got
    assert [p.name for p in stale_temps(tmp_path, "z_*")] == [".z_00003.npy.tmp-1"]
    assert len(stale_temps(tmp_path)) == 4
    assert stale_temps(tmp_path / "missing") == []


def test_progress_bar():
    items = [1, 2, 3]
    assert progress_bar(items, False, "x") is items
    out = io.StringIO()
    assert list(progress_bar(iter(items), True, "counting", total=3, file=out, mininterval=0)) == items
    assert "counting" in out.getvalue() and "3/3" in out.getvalue()  # total reached the bar (an iterator has no len)


def test_pick_device():
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device(None) == pick_device("auto") == pick_device("") == auto
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)  # an explicit name is taken as given


def test_eval_mode_restores_flag_also_on_error():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    m.train()
    with eval_mode(m) as same:
        assert same is m and not m.training and not m[1].training
    assert m.training and m[1].training
    m.eval()
    with eval_mode(m):
        assert not m.training
    assert not m.training
    m.train()
    with pytest.raises(ValueError), eval_mode(m):
        raise ValueError
    assert m.training
