"""Where documents come from: local C4-format shards or the HF hub (`allenai/c4`, `en`).

A source yields, in a fixed order, one event per input record:
`(cursor, text, skip_kind)` — text is None when the record was skipped (skip_kind says
why, see c4_format). `cursor` is a JSON-able position *after* that record; iterating
again from it continues exactly there, which is how prepare_data resumes.

Two readers give the same documents in the same order (tested):
- "gzip": plain gzip+json over local files (core dependencies only; sorts bad input);
- "hf": `datasets.load_dataset(..., streaming=True)`; the hub and local files go through
  the same function, only path/name/data_files differ. `datasets` is an optional extra,
  imported lazily. It cannot skip a bad record: on local files, a record it cannot parse
  or a corrupt gzip stream stops preparation with a DataError naming the file (the gzip
  reader's wording for a corrupt gzip stream).
"""

from __future__ import annotations

import glob
import gzip
import os
import pathlib
import zlib
from collections.abc import Iterator
from typing import Any, Protocol

from data.errors import DataError
from data.preparation import c4_format

HUB_PATH = "allenai/c4"
HUB_NAME = "en"

Event = tuple[Any, str | None, str | None]
"""(cursor after the record, its text or None, the skip kind or None)."""


class Source(Protocol):
    """What preparation reads (LocalSource, HubSource, or a test's wrapper)."""

    def describe(self) -> dict:
        """JSON-able identity, kept in the manifest: resuming with a different one is refused."""
        ...

    def progress(self) -> float:
        """Fraction of the input read so far (0 when unknown), for the progress bar's estimate."""
        ...

    def events(self, cursor: Any = None) -> Iterator[Event]:
        """One event per input record, from `cursor` (None: the start) on."""
        ...


def resolve_local_files(spec: str | os.PathLike, split: str) -> list[pathlib.Path]:
    """The split's json.gz files under a directory (searched recursively) or matching a glob, sorted."""
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob(f"c4-{split}.*.json.gz")]
    else:
        matched = [pathlib.Path(p) for p in glob.glob(str(path), recursive=True)]
        files = [p for p in matched if p.is_file() and _glob_split(p) == split]
    return sorted(files, key=lambda p: str(p))


def _glob_split(path: pathlib.Path) -> str:
    # C4 names say their split; for other names, "validation" in the name decides.
    return c4_format.split_of(path) or ("validation" if "validation" in path.name else "train")


def load_hf_stream(path: str, *, name: str | None = None, data_files=None, split: str = "train"):
    """`datasets.load_dataset(..., streaming=True)`: the one function for hub and local files."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            "the HF reader needs the optional `datasets` package. Fix: `pip install datasets` "
            "(or install this project's `hf` extra), or read local shards with --reader gzip."
        ) from exc
    try:
        return datasets.load_dataset(path, name, data_files=data_files, split=split, streaming=True)
    except ConnectionError as exc:
        raise DataError(
            f"cannot reach {path!r} on the HF hub ({exc}). Fix: run where the hub is reachable, or download "
            "the C4 json.gz shards (e.g. `huggingface-cli download allenai/c4 --repo-type dataset --include "
            "'en/c4-train.0000*'`) and pass that folder as --source."
        ) from exc


def hf_texts(ds, skip: int = 0) -> Iterator[Event]:
    if skip:
        ds = ds.skip(skip)
    for count, example in enumerate(ds, start=skip + 1):
        text = example.get("text")
        if isinstance(text, str):
            yield count, text, None
        else:
            yield count, None, c4_format.MISSING_TEXT


class LocalSource:
    """Local C4-format shards of one split, read with the gzip reader or the HF json builder."""

    def __init__(self, spec: str | os.PathLike, split: str, reader: str = "gzip"):
        if reader not in ("gzip", "hf"):
            raise ValueError(f"reader must be 'gzip' or 'hf', got {reader!r}")
        self.files = resolve_local_files(spec, split)
        if not self.files:
            raise DataError(
                f"no {split} shards found at {spec} (looking for c4-{split}.*.json.gz). Fix: point --source at a "
                "folder of C4 json.gz shards (for the sample corpus run `python tools/fetch_assets.py` first)."
            )
        self.spec, self.split, self.reader = str(spec), split, reader
        self._files_done = 0

    def describe(self) -> dict:
        return {
            "kind": "local",
            "reader": self.reader,
            "split": self.split,
            "files": [str(p) for p in self.files],
            "sizes": [p.stat().st_size for p in self.files],
        }

    def progress(self) -> float:
        """Fraction of input files fully read (for the ETA when no limit is given)."""
        return self._files_done / len(self.files)

    def events(self, cursor=None) -> Iterator[Event]:
        if self.reader == "hf":
            read = cursor or 0
            try:  # load_dataset reads the first file already (to infer the columns)
                ds = load_hf_stream("json", data_files=[str(p) for p in self.files], split="train")
                for event in hf_texts(ds, skip=read):
                    read = event[0]
                    yield event
            except (ValueError, OSError, EOFError, zlib.error) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise self._hf_error(read, exc) from exc
            return
        file_idx, line = cursor or (0, 0)
        self._files_done = file_idx
        for fi in range(file_idx, len(self.files)):
            for line_no, text, skip in c4_format.iter_records(self.files[fi], start_line=line if fi == file_idx else 0):
                yield (fi, line_no + 1), text, skip
            self._files_done = fi + 1

    def _hf_error(self, read: int, exc: Exception) -> DataError:
        """The DataError for the HF reader failing after `read` records; it does not say in which file, so the
        file is found by counting records (non-blank lines, as it counts them): a slow second read, on failure
        only."""
        seen = 0
        for path in self.files:
            try:
                with gzip.open(path, "rb") as gz:
                    seen += sum(1 for line in gz if line.strip())
            except (OSError, EOFError, zlib.error):
                # A corrupt gzip stream: the gzip reader raises its DataError for it, which names the line.
                for _ in c4_format.iter_records(path):
                    pass
                break  # it read the file after all: the general message below
            if seen > read:
                return DataError(
                    f"{path}: the HF reader cannot read a record of it ({type(exc).__name__}: {exc}); unlike the "
                    "gzip reader, it cannot skip a bad record. Fix: prepare with --reader gzip (the default: it "
                    "skips and counts bad records) into a new --out (the reader is one of its recorded settings), "
                    "or repair this file or remove it from --source."
                )
        return DataError(
            f"the HF reader failed after record {read} of the {len(self.files)} file(s) of --source {self.spec} "
            f"({type(exc).__name__}: {exc}). Fix: prepare with --reader gzip (the default: it skips and counts bad "
            "records and names a damaged file) into a new --out (the reader is one of its recorded settings)."
        )


class HubSource:
    """`allenai/c4` (config `en`) streamed from the HF hub."""

    def __init__(self, split: str, path: str = HUB_PATH, name: str = HUB_NAME):
        self.split, self.path, self.name = split, path, name

    def describe(self) -> dict:
        return {"kind": "hf", "path": self.path, "name": self.name, "split": self.split}

    def progress(self) -> float:
        return 0.0

    def events(self, cursor=None) -> Iterator[Event]:
        yield from hf_texts(load_hf_stream(self.path, name=self.name, split=self.split), skip=cursor or 0)


def make_source(spec: str, split: str, reader: str = "gzip") -> LocalSource | HubSource:
    """`hf` -> the hub; anything else -> local shards (directory or glob)."""
    if spec == "hf":
        return HubSource(split)
    return LocalSource(spec, split, reader)
