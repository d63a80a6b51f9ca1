import pytest
import torch

from trainer import checkpoint as ckpt


def latest(directory):
    path = ckpt.latest_checkpoint(directory)
    assert path is not None, f"no checkpoint in {directory}"
    return path


def state(v):
    return {"model": {"w": torch.full((4,), float(v))}, "step": v, "rng": ckpt.rng_state()}


def test_save_load_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]
    loaded = ckpt.load_checkpoint(latest(tmp_path))
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
    newest = latest(tmp_path)
    assert newest.name == "step_00000001.pt"  # the .tmp leftover is not a checkpoint
    assert ckpt.load_checkpoint(newest)["step"] == 1
    # The next save completes and replaces the leftover.
    ckpt.save_checkpoint(tmp_path, 2, state(2), keep_last=1)
    assert ckpt.load_checkpoint(latest(tmp_path))["step"] == 2


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


class Box:
    """A minimal Stateful component."""

    def __init__(self, value=0.0):
        self.value = torch.tensor(value)

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, state):
        if state["value"].shape != self.value.shape:
            raise RuntimeError(f"size mismatch: {tuple(state['value'].shape)} vs {tuple(self.value.shape)}")
        self.value = state["value"].clone()


def test_checkpointer_saves_and_restores_each_component_with_the_step_once(tmp_path):
    progress, box = ckpt.TrainProgress(step=7, tokens_seen=700), Box(3.0)
    saver = ckpt.Checkpointer(tmp_path, {"progress": progress, "box": box}, keep_last=2)
    path = saver.save(7, {"config": {"run": {"seed": 1}}})
    raw = ckpt.load_checkpoint(path)
    assert raw["format_version"] == ckpt.FORMAT_VERSION == 2
    assert raw["progress"] == {"step": 7, "tokens_seen": 700} and raw["config"] == {"run": {"seed": 1}}
    fresh_progress, fresh_box = ckpt.TrainProgress(), Box()
    loader = ckpt.Checkpointer(tmp_path, {"progress": fresh_progress, "box": fresh_box}, keep_last=2)
    assert loader.latest() == path
    assert loader.restore(path)["config"] == {"run": {"seed": 1}}
    assert (fresh_progress.step, fresh_progress.tokens_seen) == (7, 700) and float(fresh_box.value) == 3.0


def test_a_component_that_does_not_fit_names_itself_and_the_file(tmp_path):
    path = ckpt.Checkpointer(tmp_path, {"box": Box(1.0)}, keep_last=1).save(1, {})
    wider = ckpt.Checkpointer(tmp_path, {"box": Box([1.0, 2.0])}, keep_last=1)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot restore the box from .*step_00000001\.pt: size mismatch"):
        wider.restore(path)
    missing = ckpt.Checkpointer(tmp_path, {"box": Box(), "other": Box()}, keep_last=1)
    with pytest.raises(ckpt.CheckpointError, match=r"lacks other: it is incomplete"):
        missing.restore(path)


def test_version_1_checkpoints_are_upgraded_on_load(tmp_path):
    """The flat layout written before components (the step in three places) still loads."""
    v1 = {
        "format_version": 1,
        "model": {"w": torch.ones(2)},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"step": 5},
        "step": 5,
        "tokens_seen": 640,
        "data": {"step": 5, "epoch": 0, "position": 40, "tokens_seen": 640, "seed": 1, "n_windows": 100},
        "rng": ckpt.rng_state(),
        "config": {"run": {"seed": 0}},
    }
    path = tmp_path / "step_00000005.pt"
    torch.save(v1, path)
    state = ckpt.load_checkpoint(path)
    assert state["format_version"] == 2 and state["progress"] == {"step": 5, "tokens_seen": 640}
    assert state["data"] == {"seed": 1, "n_windows": 100} and "step" not in state and "scheduler" not in state
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["config"] == {"run": {"seed": 0}}


def test_unknown_format_version_is_named(tmp_path):
    path = tmp_path / "step_00000001.pt"
    torch.save({"format_version": 9, "model": {}}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"found format_version 9; this version reads 1 and 2"):
        ckpt.load_checkpoint(path)
