"""Checkpoints: one file per save, written atomically, loadable with torch.load(weights_only=True).

A checkpoint is assembled from components that each own `state_dict` / `load_state_dict`
(torch.distributed.checkpoint's `Stateful` protocol): the trainer's are `progress` (the step,
stored here and nowhere else, and tokens seen), `model`, `optimizer` (the update strategy),
`data` (which sample order the run is on) and `rng`; plus `config` (the resolved config, read to
warn about changes, never restored). `Checkpointer` saves and restores them by name.

Format (`format_version`): 2 = the components above. 1 (before components) stored the step
three times (`step`, `scheduler.step`, `data.step`) next to `tokens_seen`, `model`, `optimizer`,
`data`, `rng`, `config`; it is upgraded on load, so runs saved by earlier versions resume.

`step_00000100.pt`: a save writes `<name>.<pid>.<8 hex>.tmp` (unique per writer, so two writers
never share it), fsyncs it, then renames it over the final name (atomic on POSIX), so a crash or
kill during a save leaves every earlier checkpoint intact and never leaves a half-written file
under a final name. Older checkpoints beyond `keep_last` are deleted only after the new one is in
place. A save that fails (disk full, any OSError) removes its temporary file and raises a
CheckpointError with the checkpoint's size; a writer killed outright leaves its temporary file,
which `trainer.run_lock.remove_stale_temp_files` removes at the next start.

Several ranks (ddp or fsdp2) save a directory `step_00000100/` instead, through
torch.distributed.checkpoint: every rank writes its part of the model and optimizer tensors, the
other components go to its `extras.pt`, committed by one rename as above
(trainer/dist_checkpoint.py). Either format resumes on any number of ranks (a single file into
FSDP2 shards: trainer/full_state.py).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from data.files import unique_atomic_file
from trainer.dist_checkpoint import EXTRAS, load_sharded, read_extras, save_sharded
from trainer.distributed import DistInfo
from trainer.run_lock import format_bytes, free_space

FORMAT_VERSION = 2
_LEGACY_DATA_KEYS = ("step", "epoch", "position", "tokens_seen")  # positions version 1 kept in `data`
# step_00000100.pt (one process) or step_00000100/ (several ranks, trainer/dist_checkpoint.py)
_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")
SHARDED_COMPONENTS = ("model", "optimizer")  # what a multi-rank checkpoint holds as DCP tensors


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary files from interrupted saves are ignored)."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _NAME.match(p.name)) and (p.is_file() if m.group(2) else (p / EXTRAS).is_file())
    ]
    return [p for _, p in sorted(found)]


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_nbytes(state: Any) -> int:
    """The bytes of the tensor storages in `state` (nested dicts, lists, tuples), each storage once:
    what torch.save writes for them. The pickled rest (the structure, Python numbers) and the zip
    headers add kilobytes, so this is the size of a checkpoint to within that."""
    seen: set[tuple[str, int, int]] = set()
    total = 0
    stack = [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` as `step`'s checkpoint in `directory` (see the module docstring); then delete
    all but the `keep_last` newest. An OSError (disk full, not writable) is a CheckpointError, with
    every earlier checkpoint untouched and no temporary file left."""
    final = checkpoint_path(directory, step)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with unique_atomic_file(final) as f:  # e.g. KeyboardInterrupt: no temporary file is left behind either
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
    except BaseException as e:
        if _caused_by(e, KeyboardInterrupt) and not isinstance(e, KeyboardInterrupt):
            # A second Ctrl-C inside torch.save comes out of its zip writer as a RuntimeError ("unexpected pos").
            raise KeyboardInterrupt from e
        os_error = _caused_by(e, OSError) if isinstance(e, Exception) else None
        if os_error is None:
            raise
        raise CheckpointError(_save_failed_message(directory, step, state, os_error)) from e
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep_last]:
        remove_checkpoint(old)
    return final


E = TypeVar("E", bound=BaseException)


def _caused_by(e: BaseException, kind: type[E]) -> E | None:
    """The `kind` exception that `e` is or that caused it: when a write fails inside torch.save (e.g. disk
    full, or a KeyboardInterrupt), torch's zip writer raises a RuntimeError ("unexpected pos ...") while
    cleaning up."""
    seen = 0
    current: BaseException | None = e
    while current is not None and seen < 8:
        if isinstance(current, kind):
            return current
        current, seen = current.__cause__ or current.__context__, seen + 1
    return None


def _save_failed_message(directory: Path, step: int, state: dict[str, Any], e: OSError) -> str:
    """The size is the state's tensor bytes (`state_nbytes`), not the bytes written before the error
    (that is only where the disk filled up), and not a trial serialisation (which would need as
    much memory again as the state, at a moment when resources are short)."""
    size = state_nbytes(state)
    free = free_space(directory) if directory.is_dir() else None
    free_text = f"; {format_bytes(free)} is free there" if free is not None else ""
    previous = latest_checkpoint(directory)
    if previous is not None:
        kept = f"the previous checkpoint {previous.name} and metrics.jsonl are intact (a re-run resumes from it)"
    else:
        kept = "metrics.jsonl is intact; there is no earlier checkpoint, so a re-run starts again at step 0"
    return (
        f"cannot save the step {step} checkpoint in {directory}: {e.strerror or e} ({type(e).__name__}). "
        f"It needs about {format_bytes(size)} (the bytes of its tensors){free_text}. Nothing was lost: the "
        f"unfinished file was removed, and {kept}. Free space there (other runs, older checkpoints) and re-run "
        f"the same command; older checkpoints are deleted only after a save succeeds, so the disk must hold "
        f"checkpoint.keep_last + 1 of them (a lower --checkpoint.keep_last needs less). Or train in another "
        f"--run.dir."
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    fix = (
        f"Delete {path} to resume from the previous checkpoint in {path.parent}, "
        f"or start a new run with another --run.dir."
    )
    try:
        state = read_extras(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {detail}). {fix}"
        ) from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version == 1:
        state = _upgrade_from_v1(state)
    elif version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a memopt-lm checkpoint of a known format (found format_version {version!r}; this "
            f"version reads 1 and {FORMAT_VERSION}). {fix}"
        )
    return state


def _upgrade_from_v1(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (one flat dict, the step in three places) -> version 2 (components)."""
    data = {k: v for k, v in state["data"].items() if k not in _LEGACY_DATA_KEYS}
    progress = {"step": int(state["step"]), "tokens_seen": int(state.get("tokens_seen", 0))}
    kept: dict[str, Any] = {k: state[k] for k in ("model", "optimizer", "rng", "config") if k in state}
    return {"format_version": FORMAT_VERSION, "progress": progress, "data": data, **kept}


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """The streams of this process. On CUDA only the current device's generator: each rank draws from its own
    device's, and every rank's stream is the same (one seed), so rank 0's, which the checkpoint holds, restores
    every rank, on any number of visible devices. (All devices' generators, as get_rng_state_all gives them, would
    hand rank r rank 0's never-used copy of device r's.)"""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        # Checkpoints written before this held every device's generator: rank 0's own was device 0's.
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


class RNGState:
    """The process's RNG streams (torch CPU, CUDA, Python's random) as a checkpoint component."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


@dataclass
class TrainProgress:
    """Completed optimizer steps and tokens seen: the one place the step is stored; and whether the
    evaluation due at this step was abandoned by a stop request (it runs first on resume)."""

    step: int = 0
    tokens_seen: int = 0
    eval_pending: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "eval_pending": self.eval_pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.eval_pending = bool(state.get("eval_pending", False))  # absent before it existed


class ShardedBackend(Protocol):
    """Writes and reads the model and optimizer part of a multi-rank checkpoint directory, every rank its
    share; the other components go to the directory's extras.pt. `layout` is recorded there, and a
    directory of another layout is refused on restore (`check_checkpoint_fits`)."""

    layout: str

    def save(self, directory: Path, step: int, extras: dict[str, Any]) -> Path: ...

    def load(self, path: Path) -> None: ...


@dataclass
class ShardedParts:
    """The model and optimizers of a ddp / fsdp2 run, through DCP (trainer/dist_checkpoint.py)."""

    model: nn.Module
    optimizers: Callable[[], list[torch.optim.Optimizer]]
    info: DistInfo
    layout: str = "dcp"

    def save(self, directory: Path, step: int, extras: dict[str, Any]) -> Path:
        return save_sharded(directory, step, self.model, self.optimizers(), extras, self.info)

    def load(self, path: Path) -> None:
        load_sharded(path, self.model, self.optimizers(), self.info.device)


def check_checkpoint_fits(
    state: dict[str, Any], path: Path, *, engine: str, world_size: int, layout: str, zero_stage: int
) -> None:
    """CheckpointError before any heavy work when `path` cannot resume this run: a DeepSpeed directory
    (tied to its engine, rank count and ZeRO stage) elsewhere, or another layout under DeepSpeed.
    `layout`: how this run saves, and so what it reads besides single files: "file" (one process) and
    "dcp" (ddp / fsdp2) read DCP directories too; "gathered" (AdaLomo under ZeRO-3) reads single files
    only; "deepspeed" (DeepSpeed's AdamW) its own directories only."""
    saved = "file" if not path.is_dir() else str(state.get("layout", "dcp"))
    if saved == "deepspeed":
        ranks, stage = state.get("world_size"), state.get("config", {}).get("train", {}).get("zero_stage")
        if layout != "deepspeed" or ranks != world_size or stage != zero_stage:
            raise CheckpointError(
                f"{path} was saved by DeepSpeed at ZeRO stage {stage} on {ranks} ranks; its partitions resume only "
                f"there: run it with --train.engine=deepspeed --train.zero_stage={stage} on {ranks} ranks (this run: "
                f"{engine}{f' stage {zero_stage}' if layout == 'deepspeed' else ''} on {world_size}), or start a new "
                "run with another --run.dir"
            )
        return
    if layout == "deepspeed":
        what = "a single-file checkpoint" if saved == "file" else "a torch.distributed.checkpoint directory"
        raise CheckpointError(
            f"{path} is {what} (saved by ddp/fsdp2 or one process); DeepSpeed's ZeRO optimizer cannot load it: "
            "resume with --train.engine=fsdp2 or ddp, or start a new run with another --run.dir"
        )
    if layout == "gathered" and saved == "dcp":
        raise CheckpointError(
            f"{path} is a torch.distributed.checkpoint directory (saved by ddp/fsdp2 on several ranks); AdaLomo under "
            "DeepSpeed ZeRO-3 reads single files: resume with --train.engine=fsdp2 or ddp, or start a new run"
        )


class Checkpointer:
    """Saves and restores named components (see the module docstring) in `directory`; with `sharded`
    and several ranks, as a DCP directory (trainer/dist_checkpoint.py)."""

    def __init__(
        self,
        directory: Path,
        components: dict[str, Stateful],
        keep_last: int,
        sharded: ShardedBackend | None = None,
    ):
        self.directory = directory
        self.components = components
        self.keep_last = keep_last
        self.sharded = sharded

    def save_on_every_rank(self, step: int, metadata: dict[str, Any], info: DistInfo) -> Path | None:
        """`step`'s checkpoint, called by every rank: several ranks write a sharded directory together
        (each its part); otherwise every rank collects the components' state (a component may gather, a
        collective) and the main rank writes the single file. The path on the main rank, else None."""
        if self.sharded is not None and info.enabled:
            extras = {n: c.state_dict() for n, c in self.components.items() if n not in SHARDED_COMPONENTS}
            layout = {"layout": self.sharded.layout, "world_size": info.world_size}
            path = self.sharded.save(
                self.directory, step, {"format_version": FORMAT_VERSION, **metadata, **extras, **layout}
            )
            if info.is_main:
                for old in list_checkpoints(self.directory)[: -self.keep_last]:
                    remove_checkpoint(old)
            return path if info.is_main else None
        if not info.is_main:
            self.state_dicts()  # a component may gather its state (a collective): every rank takes part
            return None
        return self.save(step, metadata)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def state_dicts(self) -> dict[str, Any]:
        return {name: component.state_dict() for name, component in self.components.items()}

    def save(self, step: int, metadata: dict[str, Any]) -> Path:
        """Write every component's state (plus `metadata`, e.g. the config) as `step`'s checkpoint file."""
        return save_checkpoint(self.directory, step, {**metadata, **self.state_dicts()}, self.keep_last)

    def restore(self, path: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load `path` (or `state`, already loaded from it) into every component; returns the whole
        checkpoint dict (for its metadata). A component that is missing or does not fit (another
        model shape, another optimizer or fused setting) is a CheckpointError naming the file and
        the component."""
        if state is None:
            state = load_checkpoint(path)
        names = list(self.components)
        if path.is_dir():  # a multi-rank checkpoint: model and optimizer from its DCP tensors
            if self.sharded is None:
                raise CheckpointError(
                    f"{path} is a sharded checkpoint of a multi-rank run; read it with the trainer (train.py resumes "
                    f"it on any number of ranks) or trainer.dist_checkpoint.read_full_tensors"
                )
            try:
                self.sharded.load(path)
            except (ValueError, KeyError, RuntimeError) as e:
                raise _restore_failed("model and optimizer", path, e) from None
            names = [n for n in names if n not in SHARDED_COMPONENTS]
        missing = [name for name in names if name not in state]
        if missing:
            raise CheckpointError(
                f"{path} lacks {', '.join(missing)}: it is incomplete. Delete it to resume "
                f"from the previous checkpoint in {path.parent}, or start a new run."
            )
        for name in names:
            component = self.components[name]
            try:
                component.load_state_dict(state[name])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise _restore_failed(name, path, e) from None
        return state


DETAIL_CHARS = 1000  # of a component's error, in a restore failure: whole sentences of our own errors fit


def _restore_failed(what: str, path: Path, e: Exception) -> CheckpointError:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(". ")
    if len(detail) > DETAIL_CHARS:  # e.g. torch's list of every missing and unexpected key
        detail = detail[:DETAIL_CHARS] + " [...]"
    return CheckpointError(
        f"cannot restore the {what} from {path}: {detail}. Resume with the settings the run was started with "
        f"(see {path.parent.parent / 'config.yaml'}), or start a new run with another --run.dir."
    )
