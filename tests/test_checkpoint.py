import pytest
import torch

from warp_rlhf.checkpoint import atomic_dir, atomic_file, load_tensors, read_json, save_tensors, write_json


class Boom(Exception):
    pass


def test_interrupted_folder_write_leaves_nothing_and_the_old_folder_intact(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(Boom), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise Boom
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(Boom), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("second")
        raise Boom
    assert (target / "a.txt").read_text() == "first" and list(tmp_path.iterdir()) == [target]


def test_completed_folder_replaces_the_old_one(tmp_path):
    target = tmp_path / "model"
    for text in ("first", "second"):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text(text)
    assert (target / "a.txt").read_text() == "second" and list(tmp_path.iterdir()) == [target]


def test_interrupted_file_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": 1})
    with pytest.raises(Boom), atomic_file(path) as tmp:
        tmp.write_text('{"a": 2')
        raise Boom
    assert read_json(path) == {"a": 1} and list(tmp_path.iterdir()) == [path]


def test_tensors_round_trip_exactly(tmp_path):
    tensors = {"w": torch.randn(3, 4), "step": torch.tensor(7.0)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
