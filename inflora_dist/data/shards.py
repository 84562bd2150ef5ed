"""Writing webdataset shards to any fsspec URL, with a JSON index of counts and checksums.

Besides each shard's sha256 the index records, per sample, where its tar members start (`offsets`, the
last sample ending at `end`) and a digest of those bytes (`sample_sha256`, the first 16 hex digits of their
sha256): a reader that reads any run of samples verifies exactly the bytes it read, with no extra read, on
local disk and object stores alike (reader.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import webdataset

from inflora_dist.errors import WriteError

INDEX_VERSION = 1


@dataclass
class ShardInfo:
    """One written shard: its path relative to the dataset root, sample count, size, sha256,
    the byte offset of each sample's first tar header (so a reader can seek to any sample) and, for
    classification, the class labels its samples hold (sorted; checked against the task's classes)."""

    path: str
    samples: int
    bytes: int
    sha256: str
    offsets: list[int] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    sample_sha256: list[str] = field(default_factory=list)  # of bytes [offsets[i], offsets[i + 1] or end)
    end: int = 0  # where the last sample's members end (the tar's end blocks follow)


#: Hex digits of a sample's sha256 kept in the index (64 bits: detects changed data, not an adversary).
SAMPLE_DIGEST_CHARS = 16


def sample_digest(data: bytes | memoryview) -> str:
    """The index's digest of one sample's tar bytes."""
    return hashlib.sha256(data).hexdigest()[:SAMPLE_DIGEST_CHARS]


class _HashingFile:
    """Passes writes through to `raw` while hashing and counting them, and digests each sample's bytes.

    The tar writer buffers (it writes whole 10 KiB records), so samples are cut by position, not by write:
    `boundary(offset)` says a sample starts at that stream position (or, `begin=False`, that the last one
    ends there); `digests` fill in as the bytes arrive.
    """

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0
        self.digests: list[str] = []
        self._boundaries: deque[tuple[int, bool]] = deque()
        self._sample: Any = None  # the hash of the sample being written, if any

    def boundary(self, offset: int, begin: bool = True) -> None:
        self._boundaries.append((offset, begin))
        self._cut(self.bytes)

    def _cut(self, position: int) -> None:
        while self._boundaries and self._boundaries[0][0] <= position:
            _, begin = self._boundaries.popleft()
            if self._sample is not None:
                self.digests.append(self._sample.hexdigest()[:SAMPLE_DIGEST_CHARS])
            self._sample = hashlib.sha256() if begin else None

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        view, position = memoryview(data), self.bytes
        while view:
            self._cut(position)
            take = min(len(view), self._boundaries[0][0] - position) if self._boundaries else len(view)
            if self._sample is not None:
                self._sample.update(view[:take])
            view, position = view[take:], position + take
        self._cut(position)
        self.bytes = position
        return self.raw.write(data)


class ShardWriter:
    """Writes samples into `root/prefix-000000.tar`, `-000001.tar`, ... of at most `max_samples` each.

    Tar members get a fixed mtime so the same samples always give the same bytes
    (and checksums).
    """

    def __init__(self, root: str, prefix: str, max_samples: int, storage_options: Mapping[str, Any] | None = None):
        if max_samples < 1:
            raise ValueError(f"shard size must be >= 1 sample, got {max_samples}")
        self.root, self.prefix, self.max_samples = root, prefix, max_samples
        self.fs, self.root_path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
        self.shards: list[ShardInfo] = []
        self._raw = self._hashing = self._tar = None
        self._count = 0

    def _open_next(self) -> None:
        rel = f"{self.prefix}-{len(self.shards):06d}.tar"
        path = posixpath.join(self.root_path, rel)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._raw = self.fs.open(path, "wb")
        self._hashing = _HashingFile(self._raw)
        self._tar = webdataset.TarWriter(self._hashing, mtime=0, compress=False)  # an int mtime: no PAX headers
        self.shards.append(ShardInfo(rel, 0, 0, "", []))
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        info = self.shards[-1]
        info.end = self._tar.tarstream.offset
        self._hashing.boundary(info.end, begin=False)  # the last sample ends here; the tar's end blocks follow
        self._tar.close()
        self._raw.close()
        info.samples, info.bytes, info.sha256 = self._count, self._hashing.bytes, self._hashing.sha256.hexdigest()
        info.sample_sha256 = list(self._hashing.digests)
        self._tar = None

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample (`__key__` plus encoded-by-extension fields, e.g. `npy`, `cls`, `json`). A failed write
        (a full disk) removes the partial shard and raises WriteError naming it."""
        try:
            self._write(sample)
        except OSError as err:
            raise self._failed(err) from err

    def _write(self, sample: Mapping[str, Any]) -> None:
        if self._tar is None or self._count >= self.max_samples:
            self._close_current()
            self._open_next()
        self.shards[-1].offsets.append(self._tar.tarstream.offset)  # logical tar position of this sample
        self._hashing.boundary(self._tar.tarstream.offset)
        if "cls" in sample and int(sample["cls"]) not in self.shards[-1].classes:
            self.shards[-1].classes = sorted([*self.shards[-1].classes, int(sample["cls"])])
        self._tar.write(dict(sample))
        self._count += 1

    def close(self) -> list[ShardInfo]:
        """Finish the last shard; returns every shard written (WriteError as `write`)."""
        try:
            self._close_current()
        except OSError as err:
            raise self._failed(err) from err
        return self.shards

    def _failed(self, err: OSError) -> WriteError:
        """Remove the shard being written; the error naming it and the cause."""
        path = posixpath.join(self.root_path, self.shards[-1].path) if self.shards else self.root_path
        for stream in (self._tar, self._raw):  # the tar first: closed, it no longer flushes into the file later
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        with contextlib.suppress(OSError):
            if self._tar is not None and self.fs.exists(path):
                self.fs.rm(path)
        self._tar = None
        return WriteError(
            f"writing shard {path} failed ({type(err).__name__}: {err}); the partial shard was removed: free space "
            "(or fix the file system) and build again"
        )

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()


def write_index(
    root: str,
    shards: Iterable[ShardInfo],
    tasks: Mapping[str, Mapping[str, int]],
    storage_options: Mapping[str, Any] | None = None,
    name: str = "index.json",
) -> dict:
    """Write `root/index.json`: per shard {samples, bytes, sha256, offsets[, classes]}, per task {split: samples}."""
    index = {
        "version": INDEX_VERSION,
        "shards": {
            s.path: {k: v for k, v in asdict(s).items() if k != "path" and (k != "classes" or v)} for s in shards
        },
        "tasks": {name: dict(splits) for name, splits in tasks.items()},
    }
    write_small_file(root, name, json.dumps(index, indent=1, sort_keys=True), storage_options)
    return index


def write_small_file(root: str, name: str, text: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """`text` as `root/name` on any fsspec store; a failed write raises WriteError naming the file."""
    fs, root_path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    path = posixpath.join(root_path, name)
    try:
        with fs.open(path, "w") as f:
            f.write(text)
    except OSError as err:
        raise WriteError(f"writing {path} failed ({type(err).__name__}: {err}): free space and build again") from err
