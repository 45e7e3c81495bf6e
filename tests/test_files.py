"""kolors_lib.core.files: atomic writes keep normal permissions and leave nothing behind on error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kolors_lib.core.files import (
    move_aside,
    save_safetensors,
    save_torch,
    sha256_file,
    staged_folder,
    swap_folder,
    write_bytes,
    write_json,
    write_text,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_have_umask_permissions(tmp_path: Path, umask_022: None) -> None:
    files = [write_bytes(tmp_path / "a.bin", b"x"), write_text(tmp_path / "b.txt", "中文\n"),
             write_json({"k": "值"}, tmp_path / "c.json"),
             save_safetensors({"w": torch.ones(2)}, tmp_path / "d.safetensors", {"alpha": "4"}),
             save_torch({"step": 1}, tmp_path / "e.pt")]
    assert [oct(f.stat().st_mode & 0o777) for f in files] == ["0o644"] * 5
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == '{\n  "k": "值"\n}\n'
    assert torch.equal(load_file(str(tmp_path / "d.safetensors"))["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json", "d.safetensors", "e.pt"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = write_text(tmp_path / "report.json", "old")
    with pytest.raises(TypeError):
        write_json({"bad": object()}, target)  # not JSON-serialisable: fails before the rename
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_staged_folder_swaps_in_whole_or_not_at_all(tmp_path: Path, umask_022: None) -> None:
    dest = tmp_path / "out"
    with staged_folder(dest) as stage:
        (stage / "one.txt").write_text("1")
    assert oct(dest.stat().st_mode & 0o777) == "0o755" and (dest / "one.txt").read_text() == "1"
    with pytest.raises(RuntimeError), staged_folder(dest) as stage:
        (stage / "two.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in dest.iterdir()) == ["one.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_swap_folder_replaces_and_removes_old(tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "stale").write_text("s")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "fresh").write_text("f")
    swap_folder(tmp_path / "new", tmp_path / "dest")
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["fresh"]
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]


def test_sha256_and_move_aside(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "f", b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    first = move_aside(path, "old")
    write_bytes(path, b"new")
    second = move_aside(path, "old")
    assert (first.name, second.name) == ("f.old-1", "f.old-2") and first.read_bytes() == b"abc"
    assert move_aside(tmp_path / "missing") is None


def test_safetensors_bytes_are_the_same_for_the_same_input(tmp_path: Path) -> None:
    """Issue 10.3: metadata key order made identical saves differ; a no-op save leaves the file alone."""
    import time

    import torch
    from safetensors.torch import load_file, safe_open

    from kolors_lib.core.files import save_safetensors, sha256_file

    tensors = {"b.lora_B": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "a.lora_A": torch.ones(3, 2, dtype=torch.bfloat16), "scalar": torch.tensor(2.0)}
    meta = {k: str(i) for i, k in enumerate("kjihgfedcba")}
    a, b = save_safetensors(tensors, tmp_path / "a.safetensors", meta), save_safetensors(
        dict(reversed(tensors.items())), tmp_path / "b.safetensors", dict(reversed(meta.items())))
    assert sha256_file(a) == sha256_file(b)
    back = load_file(str(a))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(a), "pt") as f:
        assert f.metadata() == meta
    before = a.stat().st_mtime_ns
    time.sleep(0.01)
    save_safetensors(tensors, a, meta)
    assert a.stat().st_mtime_ns == before
