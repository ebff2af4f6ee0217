"""tfx.core.files: a write leaves the whole new file or the old one, and no temporary."""
import os
import stat

import numpy as np
import pytest

from tfx.core import files


def test_write_text_bytes_and_copy_leave_the_whole_file_and_no_temporary(tmp_path):
    files.write_text(tmp_path / "a.txt", "one\ntwo\n")
    files.write_text(tmp_path / "b.txt", (f"line {i}\n" for i in range(1000)))
    files.write_bytes(tmp_path / "c.bin", bytes(range(256)) * 100)
    os.chmod(tmp_path / "c.bin", 0o640)
    files.copy_file(tmp_path / "c.bin", tmp_path / "d.bin")
    assert (tmp_path / "a.txt").read_text() == "one\ntwo\n"
    assert (tmp_path / "b.txt").read_text() == "".join(f"line {i}\n" for i in range(1000))
    assert (tmp_path / "d.bin").read_bytes() == bytes(range(256)) * 100
    assert stat.S_IMODE(os.stat(tmp_path / "d.bin").st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "c.bin", "d.bin"]


def test_a_new_file_gets_the_permissions_of_open(tmp_path):
    with open(tmp_path / "plain", "w"):
        pass
    files.write_text(tmp_path / "atomic", "x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(tmp_path / "plain").st_mode


def test_replacing_takes_a_writer_like_numpy(tmp_path):
    with files.replacing(tmp_path / "t.npz", "wb") as f:
        np.savez(f, x=np.arange(5))
    with np.load(tmp_path / "t.npz") as saved:
        np.testing.assert_array_equal(saved["x"], np.arange(5))
    assert os.listdir(tmp_path) == ["t.npz"]


def test_a_failure_mid_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "results.txt"
    files.write_text(path, "old\n")

    def pieces():
        yield "new, first half\n"
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        files.write_text(path, pieces())
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["results.txt"]


def test_a_failed_rename_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    files.write_text(path, "{}")

    def fail(*args):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename refused"):
        files.write_bytes(path, b"[1, 2]")
    assert path.read_text() == "{}"
    assert os.listdir(tmp_path) == ["plan.json"]


def test_on_cloud_storage_a_write_is_whole_and_trees_copy_and_move(gcs_bucket, tmp_path):
    root = f"{gcs_bucket}/files-{os.getpid()}"
    files.write_text(f"{root}/a.txt", (f"line {i}\n" for i in range(1000)))
    files.write_bytes(f"{root}/sub/b.bin", bytes(range(256)))

    def pieces():
        yield "new, first half\n"
        raise RuntimeError("network gone")

    with pytest.raises(RuntimeError, match="network gone"):
        files.write_text(f"{root}/a.txt", pieces())
    assert files.path(f"{root}/a.txt").read_text() == "".join(f"line {i}\n" for i in range(1000))

    files.copy_tree(root, tmp_path / "copy")  # Cloud Storage to local disk,
    assert (tmp_path / "copy" / "sub" / "b.bin").read_bytes() == bytes(range(256))
    files.copy_tree(tmp_path / "copy", f"{root}-copy")  # and back.
    files.move_tree(f"{root}-copy", f"{root}-moved")
    assert not files.path(f"{root}-copy").exists()
    moved = files.path(f"{root}-moved")
    assert sorted(p.name for p in moved.iterdir()) == ["a.txt", "sub"]
    assert (moved / "sub" / "b.bin").read_bytes() == bytes(range(256))
    assert not files.is_local(root) and files.join(root, "x") == f"{root}/x"
