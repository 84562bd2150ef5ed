"""Streaming a task split from webdataset shards on any fsspec store.

`TaskStream` is an IterableDataset of ready batches. `plan.py` decides which
samples each rank and DataLoader worker reads; this module opens the shards
through fsspec (seeking to each run with the index's byte offsets), walks them
with webdataset's tar iterators, decodes the safe formats only (never
pickles), and pads batches so every rank takes the same number of steps.

Modes:
  * "train": shard order permuted per (seed, epoch); the shard builder already
    shuffled each task's samples before writing them;
  * "exact": index order: every sample exactly once across ranks (covariance
    and evaluation passes).

Every batch has exactly `batch_size` rows and a `weight` tensor: 1 for real
samples, 0 for padding rows (copies of a real sample).

Verification: with the index's per-sample digests (shards.py), each run of
samples is read as one byte range and every sample's bytes are checked against
its digest before they are decoded: a shard changed after its index was written
(replaced, rewritten, truncated) raises ShardError naming the shard, the sample
and what differs, before any of its samples is used. No byte is read twice. An
index without digests (shards built before they were recorded) is read
unverified, with a warning.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from inflora_dist import dist
from inflora_dist.data.images import decode_image
from inflora_dist.data.plan import RankPlan, Segment, plan_rank, replay_round_robin, worker_blocks
from inflora_dist.data.shards import sample_digest
from inflora_dist.data.spec import TaskSequenceConfig
from inflora_dist.errors import UserError

if TYPE_CHECKING:
    from inflora_dist.data.transforms import Transform

logger = logging.getLogger(__name__)

MODES = ("train", "exact")
ON_ERROR = ("raise", "skip")


class ShardError(UserError, RuntimeError):
    """A shard could not be read, or its bytes differ from the index: names the URL and, where known, the tar
    member or sample. Built from one message (so a DataLoader worker's error keeps its type)."""

    def __init__(self, message: str, url: str | None = None, member: str | None = None) -> None:
        super().__init__(message)
        self.url, self.member = url, member

    @classmethod
    def reading(cls, url: str, member: str | None, reason: str) -> ShardError:
        """`cannot read shard <url> (member <member>): <reason>`."""
        where = f"{url} (member {member})" if member else url
        return cls(f"cannot read shard {where}: {reason}", url, member)

    @property
    def reason(self) -> str:
        """The message without a DataLoader worker's traceback (its last line is the original error)."""
        last = str(self).strip().splitlines()[-1] if str(self).strip() else ""
        return last.split("ShardError: ", 1)[-1]


# ---------------------------------------------------------------- decoding
def _image(data: bytes) -> np.ndarray:
    from PIL import Image  # only needed for image-file shards

    return np.asarray(Image.open(io.BytesIO(data)))


@functools.lru_cache(maxsize=64)
def _npy_layout(header: bytes) -> tuple[tuple[int, ...], str, np.dtype, int, int]:
    """(shape, order, dtype, count, data offset) of an .npy header; cached: shards repeat a few headers."""
    fp = io.BytesIO(header)
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    if dtype.hasobject:
        raise ValueError("refusing an .npy array of Python objects (it would need unpickling)")
    return shape, "F" if fortran else "C", dtype, int(np.prod(shape)), len(header)


def npy_loads(data: bytes) -> np.ndarray:
    """An .npy array, never unpickling; the header parse (a literal_eval) is cached per distinct header."""
    if data[6] == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] == 2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:  # rare utf-8 header version: numpy's own reader, still without pickle
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    shape, order, dtype, count, offset = _npy_layout(data[:end])
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order=order)


#: Decoders by file extension. Pickle-based formats are deliberately absent: they would run code.
DECODERS: dict[str, Callable[[bytes], Any]] = {
    "npy": npy_loads,
    "cls": lambda b: int(b),
    "json": json.loads,
    "txt": lambda b: b.decode("utf-8"),
    "png": _image,
    "jpg": _image,
    "jpeg": _image,
    "bmp": _image,
    "webp": _image,
}

#: The fields that hold a sample's image: a transform (data.train_transform) decodes and transforms them itself.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "bmp", "webp", "npy")


@functools.lru_cache(maxsize=256)
def _decoder_for(key: str) -> Callable[[bytes], Any] | None:
    return None if key.startswith("__") else DECODERS.get(key.rsplit(".", 1)[-1])


def decode_sample(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Decode each field by its extension; unknown extensions stay bytes, metadata (`__*__`) stays as is."""
    out = {}
    for key, value in raw.items():
        decoder = _decoder_for(key)
        out[key] = decoder(value) if decoder else value
    return out


def collate(rows: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """Stack arrays and numbers into tensors; strings and dicts stay lists. Adds `weight` and `__key__`."""
    batch: dict[str, Any] = {
        "__key__": [r["__key__"] for r in rows],
        "weight": torch.tensor(weights, dtype=torch.float32),
    }
    for key, first in rows[0].items():
        if key.startswith("__"):
            continue
        values = [r[key] for r in rows]
        if isinstance(first, np.ndarray):
            shapes = sorted({v.shape for v in values})
            if len(shapes) > 1:
                raise ValueError(
                    f"samples {rows[0]['__key__']}, ... hold `{key}` arrays of {len(shapes)} shapes ({shapes[0]}, "
                    f"{shapes[1]}, ...): a batch needs one; images of several sizes need a transform that makes them "
                    "one (data.train_transform and data.eval_transform, e.g. resize)"
                )
            batch[key] = torch.from_numpy(np.stack(values))
        elif isinstance(first, (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


# ---------------------------------------------------------------- reading
def read_samples(stream: Any, url: str, skip: int, count: int) -> list[dict[str, Any]]:
    """`count` raw samples (undecoded bytes) after skipping `skip`, from `stream`'s current position.

    Members are grouped into samples by key as webdataset does (consecutive
    members sharing `base_plus_ext`'s key), inline for speed. Raises
    ShardError naming the url and the member being read.
    """
    member, sample, out, position = None, None, [], 0

    def emit(done: dict[str, Any]) -> bool:
        nonlocal position
        if position >= skip:
            out.append(done)
        position += 1
        return len(out) >= count

    try:
        # skip_meta=None: no per-member regex; keyless names (webdataset's __meta__ files) are skipped below.
        for item in tar_file_iterator(stream, skip_meta=None):
            member = item["fname"]
            key, ext = base_plus_ext(member)
            if key is None:
                continue
            if sample is not None and key != sample["__key__"] and emit(sample):
                return out
            if sample is None or key != sample["__key__"]:
                sample = {"__key__": key, "__url__": url}
            sample[ext.lower()] = item["data"]
        if sample is not None and len(out) < count:
            emit(sample)
    except Exception as err:  # tarfile, network and format errors all end here
        raise ShardError.reading(url, member, f"{type(err).__name__}: {err}") from err
    if len(out) < count:
        raise ShardError.reading(url, member, f"ended after {position} samples, {skip + count} expected")
    return out


def _plain_members(data: bytes, bounds: Sequence[int], url: str) -> list[dict[str, Any]] | None:
    """The samples in `data` (sample i's members in [bounds[i], bounds[i + 1])), each member read straight from
    its ustar header; None when a header is not a plain file with a short name (the tar iterator then reads
    them). The bytes were verified against their digests, so they are what the shard builder wrote."""
    samples = []
    for start, stop in itertools.pairwise(bounds):
        sample: dict[str, Any] = {"__url__": url}
        pos = start
        while pos < stop:
            header = data[pos : pos + 512]
            if header[156:157] not in (b"0", b"\0") or header[345:346] != b"\0":  # not a file, or a long name
                return None
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            key, ext = base_plus_ext(name)
            begin = pos + 512
            if key is not None:
                sample["__key__"] = key
                sample[ext.lower()] = data[begin : begin + size]
            pos = begin + (size + 511) // 512 * 512
        if "__key__" not in sample:
            return None
        samples.append(sample)
    return samples


class ShardReader:
    """Reads segments of a split's shards through fsspec, keeping the last shard open.

    With per-sample byte offsets (from the index) a segment is read by seeking
    to its first sample; without them the shard is streamed from its start.
    With the index's per-sample digests and end offsets as well, a segment is
    read as one byte range and verified sample by sample before it is parsed.
    """

    def __init__(
        self,
        urls: Sequence[str],
        offsets: Sequence[Sequence[int]] | None,
        storage_options: Mapping[str, Any],
        digests: Sequence[Sequence[str]] | None = None,
        ends: Sequence[int] | None = None,
    ) -> None:
        self.urls, self.offsets, self.storage_options = urls, offsets, storage_options
        self.digests, self.ends = (digests, ends) if offsets is not None else (None, None)
        self._url: str | None = None
        self._file: Any = None

    def read(self, segment: Segment) -> list[dict[str, Any]]:
        """The raw samples of one segment."""
        url = self.urls[segment.shard]
        if url != self._url:
            self.close()
            try:
                self._file = fsspec.open(url, "rb", **self.storage_options).open()
            except FileNotFoundError:
                raise ShardError.reading(url, None, "file not found") from None
            except Exception as err:
                raise ShardError.reading(url, None, f"{type(err).__name__}: {err}") from err
            self._url = url
        offsets = self.offsets[segment.shard] if self.offsets else None
        self._file.seek(offsets[segment.start] if offsets else 0)
        if offsets and self.ends is not None:
            data, bounds = self._ranged(segment, url, offsets)
            samples = _plain_members(data, bounds, url)  # the members parsed in place: no second pass
            if samples is None:  # long names or other header types: the tar iterator reads them
                return read_samples(io.BytesIO(data), url, 0, segment.stop - segment.start)
            return samples
        skip = 0 if offsets else segment.start
        return read_samples(self._file, url, skip, segment.stop - segment.start)

    def _ranged(self, segment: Segment, url: str, offsets: Sequence[int]) -> tuple[bytes, list[int]]:
        """The segment's bytes, read at once, each sample checked against the index's digest (if the index has
        them), and the samples' boundaries in them."""
        assert self.ends is not None
        bounds = [*offsets[segment.start : segment.stop + 1]]
        if segment.stop == len(offsets):
            bounds.append(self.ends[segment.shard])
        try:
            data = self._file.read(bounds[-1] - bounds[0])
        except Exception as err:
            raise ShardError.reading(url, None, f"{type(err).__name__}: {err}") from err
        view = memoryview(data)
        for i, (a, b) in enumerate(itertools.pairwise(bounds) if self.digests is not None else ()):
            expected = self.digests[segment.shard][segment.start + i]
            got = sample_digest(view[a - bounds[0] : b - bounds[0]])
            if got != expected:
                raise ShardError.reading(
                    url, None, f"sample {segment.start + i} does not match the index (sha256 {got}..., the index "
                    f"has {expected}...): the shard changed after its index was written; rebuild it or restore it",
                )  # fmt: skip
        return data, [b - bounds[0] for b in bounds]

    def close(self) -> None:
        """Close the open shard, if any."""
        if self._file is not None:
            self._file.close()
        self._url = self._file = None


class TaskStream(IterableDataset):
    """Batches of one task split for this rank (and, inside a DataLoader, for this worker).

    Deterministic given (seed, epoch, number of workers); the rows of each
    micro-step across all ranks do not depend on the number of ranks (see
    plan.py). Use `set_epoch` before each epoch and `resume(n)` to skip the n
    batches this rank already consumed in the epoch (normally through
    `TaskLoader`); skipping reads nothing.

    With `transform` (a recipe of data/transforms.py) each sample's image is
    decoded to a PIL image of `channels` channels and transformed in the
    loader worker, drawing from (seed, epoch, the sample's key): the same
    pixels whichever rank or worker reads it, and again after a resume.
    """

    def __init__(
        self,
        urls: Sequence[str],
        shard_sizes: Sequence[int],
        *,
        batch_size: int,
        mode: str = "train",
        seed: int = 0,
        offsets: Sequence[Sequence[int]] | None = None,
        digests: Sequence[Sequence[str]] | None = None,
        ends: Sequence[int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        accumulation: int = 1,
        interleave: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        transform: Transform | None = None,
        channels: int = 3,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if len(urls) != len(shard_sizes) or not urls:
            raise ValueError(f"need one sample count per shard URL, got {len(urls)} URLs and {len(shard_sizes)} counts")
        if offsets is not None and [len(o) for o in offsets] != [int(s) for s in shard_sizes]:
            raise ValueError("need one byte offset per sample of every shard")
        self.urls, self.shard_sizes = list(urls), [int(s) for s in shard_sizes]
        self.offsets = [list(o) for o in offsets] if offsets is not None else None
        if digests is not None and (ends is None or [len(d) for d in digests] != [int(s) for s in shard_sizes]):
            raise ValueError("need one digest per sample of every shard, and every shard's end offset")
        if ends is not None and (offsets is None or len(ends) != len(shard_sizes)):
            raise ValueError("need the per-sample offsets with the shards' end offsets, one end per shard")
        self.digests, self.ends = digests, ends
        self.batch_size, self.mode, self.seed, self.accumulation = batch_size, mode, seed, accumulation
        self.interleave = interleave
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.storage_options = dict(storage_options or {})
        self.transform, self.channels, self.on_error = transform, channels, on_error
        self.epoch, self.consumed = 0, 0
        self.plan()  # validates rank, world size and batch size now, not in a worker

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order); starts it from its first batch."""
        self.epoch, self.consumed = epoch, 0

    def resume(self, consumed: int) -> None:
        """Skip the first `consumed` batches of the current epoch (already used before a restart)."""
        if not 0 <= consumed <= len(self):
            raise ValueError(f"cannot resume after {consumed} batches: the epoch has {len(self)}")
        self.consumed = consumed

    def plan(self) -> RankPlan:
        """This rank's share of the current epoch."""
        return plan_rank(
            self.shard_sizes,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            seed=self.seed if self.mode == "train" else None,
            epoch=self.epoch,
            multiple_of=self.accumulation,
            interleave=self.interleave,
        )

    def __len__(self) -> int:
        return self.plan().num_batches

    def _decode(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        field = next((f for f in IMAGE_FIELDS if f in raw), None) if self.transform else None
        if field is None:
            return decode_sample(raw)
        sample = decode_sample({k: v for k, v in raw.items() if k != field})
        data = npy_loads(raw[field]) if field == "npy" else raw[field]
        image = decode_image(data, self.channels, raw["__key__"])
        sample[field] = self.transform.pixels(image, self.seed, self.epoch, raw["__key__"])
        return sample

    def _rows(self, reader: ShardReader, plan: RankPlan, batch: int) -> list[dict[str, Any]]:
        rows = []
        for segment in plan.segments(batch):
            try:
                rows += reader.read(segment)
            except ShardError as err:
                if self.on_error == "raise":
                    raise
                logger.warning(
                    "skipping %d samples (%s); their rows become zero-weight padding",
                    len(range(segment.start, segment.stop)),
                    err,
                )
                reader.close()
        return rows

    def _first_sample(self, reader: ShardReader) -> dict[str, Any]:
        """Any real sample: the template of padding rows when a worker has none of its own."""
        shard = next(i for i, n in enumerate(self.shard_sizes) if n > 0)
        return self._decode(reader.read(Segment(shard, 0, 1))[0])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan()
        blocks = worker_blocks(plan.num_batches, workers)
        done, first_asked = replay_round_robin(blocks, self.consumed)
        worker = (first_asked + loader_worker) % workers  # so a resumed round robin continues the sequence
        reader = ShardReader(self.urls, self.offsets, self.storage_options, self.digests, self.ends)
        template = None
        try:
            for batch in blocks[worker][done[worker] :]:
                rows = [self._decode(r) for r in self._rows(reader, plan, batch)]
                missing = self.batch_size - len(rows)
                if missing:
                    template = template or (rows[0] if rows else self._first_sample(reader))
                yield collate(rows + [template] * missing, [1.0] * len(rows) + [0.0] * missing)
        finally:
            reader.close()


class TaskLoader:
    """A DataLoader over a TaskStream that counts the batches it delivered.

    Stateful: `state_dict()` records (epoch, batches consumed), and a loader
    restored from it continues with exactly the batches not yet seen. Each
    full pass over the loader is one epoch; the next pass starts the next.
    """

    def __init__(self, stream: TaskStream, num_workers: int = 0, **dataloader_kwargs: Any) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.dataloader_kwargs = dataloader_kwargs

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def epoch(self) -> int:
        """The epoch being read (or about to be)."""
        return self.stream.epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            **self.dataloader_kwargs,
        )
        for batch in loader:
            self.stream.consumed += 1  # counted before use: a checkpoint taken after it includes it
            yield batch
        self.stream.set_epoch(self.stream.epoch + 1)

    def state_dict(self) -> dict[str, int]:
        """Position in the stream."""
        return {"epoch": self.stream.epoch, "consumed": self.stream.consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved position."""
        self.stream.set_epoch(int(state["epoch"]))
        self.stream.resume(int(state["consumed"]))


@functools.cache
def _warn_unverified(index_url: str) -> None:
    """Once per index: its shards are read without verification."""
    logger.warning(
        "%s records no per-sample checksums (shards built before they were recorded): its samples are read "
        "without verifying them; rebuild the shards to have every read checked",
        index_url,
    )


def open_task(
    sequence: TaskSequenceConfig,
    task_index: int | Sequence[int],
    split: str,
    *,
    batch_size: int,
    mode: str,
    index: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> TaskStream:
    """A TaskStream over one split ("train" or "eval") of one task of `sequence`, or of several together.

    Several task indices give one stream over the union of their shards (the
    joint-training upper bound). Per-shard sample counts come from the
    sequence's index (`index` if already loaded); storage options from the
    sequence.
    """
    tasks = [task_index] if isinstance(task_index, int) else list(task_index)
    if not tasks or any(not 0 <= t < len(sequence.tasks) for t in tasks):
        raise ValueError(f"task indices must be in [0, {len(sequence.tasks)}), got {task_index}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    index = index if index is not None else sequence.load_index()
    urls = [u for t in tasks for u in sequence.shard_urls(t, split)]
    root = sequence.root.rstrip("/") + "/"
    entries = []
    for url in urls:
        entry = index["shards"].get(url[len(root) :] if sequence.root and url.startswith(root) else url)
        if entry is None:
            raise ValueError(f"shard {url} is not in the index {sequence.url(sequence.index)}")
        entries.append(entry)
    sizes = [int(e["samples"]) for e in entries]
    offsets = [e["offsets"] for e in entries] if all("offsets" in e for e in entries) else None
    ranged = offsets is not None and all("end" in e for e in entries)
    verifiable = ranged and all("sample_sha256" in e for e in entries)
    if not verifiable:
        _warn_unverified(sequence.url(sequence.index))
    expected = sum(getattr(sequence.tasks[t], split).samples for t in tasks)
    if sum(sizes) != expected:
        names = [sequence.tasks[t].name for t in tasks]
        raise ValueError(f"tasks {names} {split}: the spec says {expected} samples, their shards hold {sum(sizes)}")
    return TaskStream(
        urls,
        sizes,
        offsets=offsets,
        digests=[e["sample_sha256"] for e in entries] if verifiable else None,
        ends=[int(e["end"]) for e in entries] if ranged else None,
        batch_size=batch_size,
        mode=mode,
        storage_options=sequence.storage_options,
        **kwargs,
    )
