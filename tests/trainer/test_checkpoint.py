import pytest
import torch

from trainer import checkpoint as ckpt


def state(v):
    return {"model": {"w": torch.full((4,), float(v))}, "step": v, "rng": ckpt.rng_state()}


def test_save_load_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert loaded["step"] == 4 and torch.equal(loaded["model"]["w"], torch.full((4,), 4.0))


def test_interrupted_save_leaves_previous_loadable(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, state(1), keep_last=1)

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, state(2), keep_last=1)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001.pt"  # the .tmp leftover is not a checkpoint
    assert ckpt.load_checkpoint(latest)["step"] == 1
    # The next save completes and replaces the leftover.
    ckpt.save_checkpoint(tmp_path, 2, state(2), keep_last=1)
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_gives_clear_error(tmp_path, damage):
    path = ckpt.save_checkpoint(tmp_path, 5, state(5), keep_last=1)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint at all", "empty": b""}[damage])
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt or truncated.*Delete .*step_00000005\.pt"):
        ckpt.load_checkpoint(path)


def test_foreign_file_is_rejected(tmp_path):
    path = tmp_path / "step_00000001.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a memopt-lm checkpoint"):
        ckpt.load_checkpoint(path)


def test_rng_round_trip():
    saved = ckpt.rng_state()
    a = torch.rand(3)
    ckpt.set_rng_state(saved)
    assert torch.equal(torch.rand(3), a)
