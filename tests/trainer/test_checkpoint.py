import copy
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from optim import Adafactor
from tests.helpers.disk import small_tmpfs
from tests.helpers.gloo import run_ranks
from trainer import checkpoint as ckpt
from trainer import dist_checkpoint as dcp_ckpt
from trainer.distributed import DistInfo
from trainer.full_state import ModelState, local_optimizer_state
from trainer.run_lock import remove_stale_temp_files


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
    assert newest.name == "step_00000001.pt"  # the half-written file is not a checkpoint
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.pt"]  # and it was removed
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


def test_the_cuda_stream_saved_and_restored_is_the_current_devices(monkeypatch):
    """(No GPU here: torch.cuda's generator calls are stood in for.) Each rank restores rank 0's current-device
    state on its own current device, also from the list an older checkpoint held (every device's: device 0's is
    rank 0's), whatever the number of visible devices."""
    current = {"state": torch.tensor([7], dtype=torch.uint8)}
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": current["state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    for name in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: pytest.fail(f"{name}: every device's generator"))
    saved = ckpt.rng_state()
    assert torch.equal(saved["cuda"], current["state"])
    ckpt.set_rng_state(saved)
    ckpt.set_rng_state({**saved, "cuda": [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]})
    assert [int(t) for t in restored] == [7, 1]


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
    assert raw["progress"] == {"step": 7, "tokens_seen": 700, "eval_pending": False} and raw["config"] == {
        "run": {"seed": 1}
    }
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


class Refusing(Box):
    def __init__(self, message):
        super().__init__()
        self.message = message

    def load_state_dict(self, state):
        raise ValueError(self.message)


def test_a_component_error_is_quoted_whole_up_to_a_limit_then_marked_as_cut(tmp_path):
    path = ckpt.Checkpointer(tmp_path, {"box": Box()}, keep_last=1).save(1, {})
    # A DataError of the data component is a few hundred characters and ends with its own fix.
    own = "the data changed (n_windows: checkpoint 392 != now 7158; seed: checkpoint 1 != now 2). Fix: " + "x" * 300
    own += "."
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.Checkpointer(tmp_path, {"box": Refusing(own)}, keep_last=1).restore(path)
    assert f"from {path}: {own[:-1]}. Resume with the settings" in str(caught.value)
    huge = "Missing key(s): " + ", ".join(f"blocks.{i}.weight" for i in range(500))  # torch's style
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.Checkpointer(tmp_path, {"box": Refusing(huge)}, keep_last=1).restore(path)
    assert f"{huge[: ckpt.DETAIL_CHARS]} [...]. Resume with the settings" in str(caught.value)


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


def test_a_save_that_fails_removes_its_temporary_file_and_names_the_size(tmp_path, monkeypatch):
    """Any OSError (here a simulated full disk: no root needed) during a save."""
    previous = ckpt.save_checkpoint(tmp_path, 1, state(1), keep_last=1)

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    big = {"model": {"w": torch.zeros(250_000), "view": torch.zeros(250_000)[:10]}, "step": 2}
    with pytest.raises(ckpt.CheckpointError) as failed:
        ckpt.save_checkpoint(tmp_path, 2, big, keep_last=1)
    monkeypatch.undo()
    message = str(failed.value)
    assert f"cannot save the step 2 checkpoint in {tmp_path}: No space left on device (OSError)" in message
    assert "It needs about 2.0 MB (the bytes of its tensors)" in message  # the view's storage counted once
    assert "the previous checkpoint step_00000001.pt and metrics.jsonl are intact" in message
    assert "Free space there" in message and "--checkpoint.keep_last" in message and "--run.dir" in message
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.pt"]
    assert ckpt.load_checkpoint(previous)["step"] == 1


def test_a_read_only_checkpoint_directory_is_a_checkpoint_error_not_the_cleanup_s(tmp_path, monkeypatch):
    """On a read-only file system even removing the (never created) temporary file fails: that second error must
    not hide the first one's message."""
    read_only = OSError(errno.EROFS, "Read-only file system")

    def refuse(*args, **kwargs):
        raise read_only

    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(ckpt.Path, "unlink", refuse)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot save the step 2 checkpoint in .*: Read-only file system"):
        ckpt.save_checkpoint(tmp_path, 2, state(2), keep_last=1)


def test_a_second_ctrl_c_inside_torch_save_is_a_keyboard_interrupt_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    previous = ckpt.save_checkpoint(tmp_path, 1, state(1), keep_last=1)

    def interrupted(obj, f):
        f.write(b"PK\x03\x04 the first bytes")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:  # what torch's zip writer turns it into while it cleans up
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 36071168 vs 36071060")  # noqa: B904 (implicit __context__, as torch has)

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, state(2), keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == [previous.name]


def test_state_nbytes_counts_each_storage_once():
    w = torch.zeros(10, 10)
    assert ckpt.state_nbytes({"a": w, "b": [w[0], (w.T, 3)], "c": torch.zeros(5, dtype=torch.bfloat16)}) == 410
    assert ckpt.state_nbytes({"step": 3, "rng": {"python": (3, (1, 2), None)}}) == 0


def test_concurrent_saves_of_one_step_both_complete(tmp_path, monkeypatch):
    """Two writers (here threads of one process: the same pid) save the same step into one directory,
    both holding their temporary file at once: neither renames the other's file away."""
    both_written = threading.Barrier(2, timeout=20)
    replace = os.replace

    def replace_when_both_have_written(src, dst):
        both_written.wait()
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_when_both_have_written)
    savers = [ckpt.Checkpointer(tmp_path, {"box": Box(float(v))}, keep_last=1) for v in (1, 2)]
    errors: list[BaseException] = []

    def save(saver):
        try:
            saver.save(3, {})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=save, args=(s,)) for s in savers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    monkeypatch.undo()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003.pt"]
    box = Box()
    ckpt.Checkpointer(tmp_path, {"box": box}, keep_last=1).restore(latest(tmp_path))
    assert float(box.value) in (1.0, 2.0)


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        yield disk


def test_disk_full_during_a_save_then_freeing_space(small_disk):
    """The probe: a killed writer's orphaned temporary file fills the disk; the next save fails
    cleanly, and once the orphan is removed (as the trainer does at start, under the lock) it works."""
    directory = small_disk / "checkpoints"
    box = Box(1.0)
    saver = ckpt.Checkpointer(directory, {"box": box}, keep_last=1)
    previous = saver.save(1, {})
    orphan = directory / "step_00000002.pt.999999.0123abcd.tmp"
    orphan.write_bytes(b"\0" * 3_000_000)
    box.value = torch.zeros(500_000)  # 2 MB: more than the ~1.2 MB left
    with pytest.raises(ckpt.CheckpointError) as failed:
        saver.save(2, {})
    message = str(failed.value)
    assert f"cannot save the step 2 checkpoint in {directory}: No space left on device" in message
    assert "It needs about 2.0 MB (the bytes of its tensors); 1." in message and "MB is free there" in message
    assert "the previous checkpoint step_00000001.pt and metrics.jsonl are intact" in message
    assert sorted(p.name for p in directory.iterdir()) == ["step_00000001.pt", orphan.name]  # no new temporary
    restored = Box()
    ckpt.Checkpointer(directory, {"box": restored}, keep_last=1).restore(previous)
    assert float(restored.value) == 1.0
    assert remove_stale_temp_files(directory) == [orphan]
    path = saver.save(2, {})
    assert [p.name for p in directory.iterdir()] == ["step_00000002.pt"]
    assert ckpt.load_checkpoint(path)["box"]["value"].shape == (500_000,)


# Sharded (DCP) checkpoints in one process (trainer/dist_checkpoint.py): the multi-rank format without a
# process group, so its key mapping, counters and errors are checked in milliseconds, not a gloo run.
ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _model_and_adamw(
    layers: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(layers))).to(dtype)
    group = {"params": list(model.parameters()), "names": [name for name, _ in model.named_parameters()]}
    return model, torch.optim.AdamW([group], lr=0.1)


def _trained_with_counters(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """One AdamW step, then a different non-tensor counter per parameter (as this package's optimizers keep
    `step` as an int): a counter restored onto the wrong parameter would be caught."""
    model, opt = _model_and_adamw(dtype=dtype)
    model(torch.randn(3, 4, dtype=dtype)).sum().backward()
    opt.step()
    for i, p in enumerate(model.parameters()):
        opt.state[p]["count"] = 10 + i
    return model, opt


def test_a_sharded_checkpoint_restores_every_parameters_state_onto_that_parameter(tmp_path):
    # bf16: AdamW keeps its moments in the parameter's dtype, which the load must keep (not read back as fp32)
    model, opt = _trained_with_counters(torch.bfloat16)
    path = dcp_ckpt.save_sharded(tmp_path, 3, model, [opt], {"progress": 3}, ONE_PROCESS)
    fresh, fresh_opt = _model_and_adamw(dtype=torch.bfloat16)
    dcp_ckpt.load_sharded(path, fresh, [fresh_opt], torch.device("cpu"))
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
        saved, loaded = opt.state[p], fresh_opt.state[q]
        assert sorted(loaded) == sorted(saved), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert loaded[key].dtype == saved[key].dtype and torch.equal(loaded[key], saved[key]), (name, key)
        assert loaded["count"] == saved["count"], name  # 10, 11, 12, 13: each parameter its own


def test_saving_a_step_again_replaces_its_sharded_checkpoint(tmp_path):
    """A stop request right after a periodic save writes the same step twice: the second save must win, not fail
    on renaming onto the existing directory."""
    model, opt = _trained_with_counters()
    dcp_ckpt.save_sharded(tmp_path, 3, model, [opt], {"progress": "first"}, ONE_PROCESS)
    path = dcp_ckpt.save_sharded(tmp_path, 3, model, [opt], {"progress": "second"}, ONE_PROCESS)
    assert dcp_ckpt.read_extras(path)["progress"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]  # no temporary directory left


def test_read_full_tensors_returns_only_the_keys_under_its_prefix(tmp_path):
    model, opt = _trained_with_counters()
    path = dcp_ckpt.save_sharded(tmp_path, 3, model, [opt], {}, ONE_PROCESS)
    weights = dcp_ckpt.read_full_tensors(path, "model.")
    assert sorted(weights) == sorted(f"model.{name}" for name, _ in model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(weights[f"model.{name}"], p.detach()), name


def test_a_sharded_checkpoint_of_another_model_names_the_missing_or_extra_tensors(tmp_path):
    """ValueError naming the keys (the Checkpointer turns it into 'cannot restore the model and optimizer'),
    not DCP's own error deep in its planner."""
    model, opt = _trained_with_counters()
    path = dcp_ckpt.save_sharded(tmp_path, 3, model, [opt], {}, ONE_PROCESS)
    deeper, deeper_opt = _model_and_adamw(layers=3)
    with pytest.raises(ValueError, match=r"it lacks model tensors \['model\.2\.weight', 'model\.2\.bias'\]"):
        dcp_ckpt.load_sharded(path, deeper, [deeper_opt], torch.device("cpu"))
    shallower, shallower_opt = _model_and_adamw(layers=1)
    with pytest.raises(ValueError, match=r"optimizer state for '1\.(weight|bias)', which this model/optimizer"):
        dcp_ckpt.load_sharded(path, shallower, [shallower_opt], torch.device("cpu"))


def test_a_sharded_save_that_fails_removes_its_temporary_directory(tmp_path, monkeypatch):
    model, opt = _trained_with_counters()

    def failing_save(state_dict, checkpoint_id):
        checkpoint_id.mkdir()  # DCP creates the directory, then writes its files into it
        (checkpoint_id / "__0_0.distcp").write_bytes(b"half")  # what it had written when it failed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp_ckpt.dcp, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        dcp_ckpt.save_sharded(tmp_path, 3, model, [opt], {}, ONE_PROCESS)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_checkpoint_is_named_as_missing_not_as_corrupt(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"^checkpoint .*step_00000001\.pt does not exist$"):
        ckpt.load_checkpoint(tmp_path / "step_00000001.pt")


class Touches:
    """Unpickling this creates `marker`: what a hostile pickle could run instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return Path.touch, (self.marker,)


def test_a_checkpoint_holding_arbitrary_objects_is_refused_without_running_them(tmp_path):
    """torch.load(weights_only=True): a pickle that would call code is refused, and the code does not run."""
    marker = tmp_path / "ran"
    path = tmp_path / "step_00000001.pt"
    torch.save({"format_version": 2, "progress": Touches(marker)}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000001\.pt is corrupt or truncated \(UnpicklingError"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_a_save_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    """The rename is durable only once the directory entry is on disk: the directory itself is fsynced, after the
    final name exists."""
    synced: list[tuple[int, bool]] = []
    fsync = os.fsync
    final = tmp_path / "step_00000003.pt"

    def recording_fsync(fd: int) -> None:
        synced.append((os.fstat(fd).st_ino, final.exists()))
        fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", recording_fsync)
    ckpt.save_checkpoint(tmp_path, 3, state(3), keep_last=1)
    assert (tmp_path.stat().st_ino, True) in synced


class FakeSharded:
    """A ShardedBackend writing what a multi-rank save leaves (a step directory with its extras.pt), without DCP."""

    layout = "dcp"

    def __init__(self, load_error: Exception | None = None):
        self.load_error = load_error
        self.loaded: list[Path] = []

    def save(self, directory: Path, step: int, extras: dict[str, Any]) -> Path:
        path = directory / f"step_{step:08d}"
        path.mkdir(parents=True)
        torch.save(extras, path / "extras.pt")
        return path

    def load(self, path: Path) -> None:
        if self.load_error is not None:
            raise self.load_error
        self.loaded.append(path)


RANK0_OF_2 = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))


def test_sharded_saves_keep_only_the_last_directories(tmp_path):
    saver = ckpt.Checkpointer(tmp_path, {"progress": ckpt.TrainProgress(), "model": Box()}, 2, FakeSharded())
    for step in (1, 2, 3, 4):
        assert saver.save_on_every_rank(step, {}, RANK0_OF_2) == tmp_path / f"step_{step:08d}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_every_rank_collects_the_state_but_only_the_main_rank_writes_the_file(tmp_path):
    """A component's state_dict may be a collective (ZeRO-3 gathers the weights): a rank that skipped it would
    leave the others waiting."""
    calls: list[int] = []

    class Gathering(Box):
        def state_dict(self):
            calls.append(1)
            return super().state_dict()

    saver = ckpt.Checkpointer(tmp_path, {"model": Gathering(2.0)}, keep_last=1)
    rank1 = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    assert saver.save_on_every_rank(1, {}, rank1) is None
    assert calls == [1] and list(tmp_path.iterdir()) == []
    assert saver.save_on_every_rank(1, {}, RANK0_OF_2) == tmp_path / "step_00000001.pt"
    assert calls == [1, 1]
    assert torch.equal(torch.load(tmp_path / "step_00000001.pt")["model"]["value"], torch.tensor(2.0))


def test_a_sharded_checkpoint_restores_model_and_optimizer_from_its_tensors_and_the_rest_from_its_extras(tmp_path):
    progress = ckpt.TrainProgress(step=4, tokens_seen=40)
    saver = ckpt.Checkpointer(tmp_path, {"progress": progress, "model": Box(), "optimizer": Box()}, 1, FakeSharded())
    saver.save_on_every_rank(4, {}, RANK0_OF_2)
    path = tmp_path / "step_00000004"
    assert sorted(torch.load(path / "extras.pt")) == ["format_version", "layout", "progress", "world_size"]
    backend, progress = FakeSharded(), ckpt.TrainProgress()
    ckpt.Checkpointer(tmp_path, {"progress": progress, "model": Box(), "optimizer": Box()}, 1, backend).restore(path)
    assert backend.loaded == [path] and (progress.step, progress.tokens_seen) == (4, 40)
    lacking = FakeSharded(ValueError("it lacks model tensors ['model.2.weight']"))
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.Checkpointer(tmp_path, {"progress": ckpt.TrainProgress(), "model": Box()}, 1, lacking).restore(path)
    assert str(caught.value).startswith(
        f"cannot restore the model and optimizer from {path}: it lacks model tensors ['model.2.weight']. Resume with"
    )


class WrongType(Box):
    def load_state_dict(self, state):
        raise TypeError("expected a float, got a str")


def test_a_component_type_error_names_the_run_config_to_resume_with(tmp_path):
    path = ckpt.Checkpointer(tmp_path / "checkpoints", {"box": Box()}, keep_last=1).save(1, {})
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.Checkpointer(tmp_path / "checkpoints", {"box": WrongType()}, keep_last=1).restore(path)
    assert str(caught.value) == (
        f"cannot restore the box from {path}: expected a float, got a str. Resume with the settings the run was "
        f"started with (see {tmp_path / 'config.yaml'}), or start a new run with another --run.dir."
    )


def test_a_sharded_directory_without_a_layout_is_read_as_dcp(tmp_path):
    """Directories saved before extras.pt recorded `layout` are DCP ones: AdaLomo under ZeRO-3 cannot read them."""
    directory = tmp_path / "step_00000002"
    directory.mkdir()
    fits: dict[str, Any] = dict(engine="deepspeed", world_size=2, layout="gathered", zero_stage=3)
    with pytest.raises(ckpt.CheckpointError, match="AdaLomo under DeepSpeed ZeRO-3 reads single files"):
        ckpt.check_checkpoint_fits({"format_version": 2}, directory, **fits)


def _two_layers() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))  # 5 and 3 rows: uneven on 2 ranks


def _single_file_into_fsdp2_shards(rank: int, world: int) -> bool:
    """A one-process checkpoint (full tensors) loaded into a 2-rank FSDP2 model and its optimizers: every tensor
    that follows the parameter's rows keeps this rank's torch.chunk of them; the rest stays whole."""
    mesh = init_device_mesh("cpu", (world,))
    full = _two_layers()
    full_opts = [torch.optim.AdamW(full.parameters(), lr=0.1), Adafactor(full.parameters(), lr=0.1, beta1=0.9)]
    full(torch.randn(2, 4)).square().sum().backward()
    for opt in full_opts:
        opt.step()
    weights = {k: v.clone() for k, v in full.state_dict().items()}
    saved = [copy.deepcopy(opt.state_dict()) for opt in full_opts]

    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.chunk(t, world)[rank]

    model = _two_layers()
    fully_shard(model, mesh=mesh)
    ModelState(model).load_state_dict({k: v.clone() for k, v in weights.items()})  # (it distributes them in place)
    names = [name for name, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor) and torch.equal(p.to_local(), rows(weights[name])), name
    adamw = torch.optim.AdamW(model.parameters(), lr=0.1)
    local = local_optimizer_state(adamw, saved[0])
    for i, name in enumerate(names):
        want = full_opts[0].state_dict()["state"][i]
        for key in ("exp_avg", "exp_avg_sq"):
            got = local["state"][i][key]
            assert isinstance(got, DTensor) and got.shape == want[key].shape, (name, key)
            assert torch.equal(got.to_local(), rows(want[key])), (name, key)
        assert torch.equal(local["state"][i]["step"], want["step"]), name
        for key, value in want.items():  # the full state dict it was given is left whole
            assert torch.equal(saved[0]["state"][i][key], value), (name, key)
    adamw.load_state_dict(local)
    factored = Adafactor(model.parameters(), lr=0.1, beta1=0.9)
    local = local_optimizer_state(factored, saved[1])
    for i, name in enumerate(names):
        want = full_opts[1].state_dict()["state"][i]
        for key, value in want.items():
            got = local["state"][i][key]
            if not torch.is_tensor(value):
                assert got == value, (name, key)
            elif key == "exp_avg_sq_col" or value.dim() == 0:  # whole on every rank
                assert torch.equal(got, value), (name, key)
            else:  # exp_avg, exp_avg_sq_row, a vector's exp_avg_sq: the parameter's rows
                assert torch.equal(got, rows(value)), (name, key)
    return True


def test_a_single_file_checkpoint_loads_each_ranks_rows_into_fsdp2_shards():
    assert run_ranks(_single_file_into_fsdp2_shards, 2) == [True, True]
