"""Streaming a task split from webdataset shards on any fsspec store.

`TaskStream` is an IterableDataset of ready batches. `plan.py` decides which
samples each rank and DataLoader worker reads; this module opens the shards
through fsspec, walks them with webdataset's tar iterators, decodes the safe
formats only (never pickles), and pads batches so every rank takes the same
number of steps.

Modes:
  * "train": shard order permuted per (seed, epoch), then a seeded shuffle buffer;
  * "exact": index order, no shuffle: every sample exactly once across ranks
    (covariance and evaluation passes).

Every batch has exactly `batch_size` rows and a `weight` tensor: 1 for real
samples, 0 for padding rows (copies of a real sample).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from inflora_dist import dist
from inflora_dist.data.plan import RankPlan, Segment, plan_rank, replay_round_robin, worker_blocks
from inflora_dist.data.spec import TaskSequenceConfig

logger = logging.getLogger(__name__)

MODES = ("train", "exact")
ON_ERROR = ("raise", "skip")


class ShardError(RuntimeError):
    """A shard could not be read: names the URL and, where known, the tar member."""

    def __init__(self, url: str, member: str | None, reason: str) -> None:
        where = f"{url} (member {member})" if member else url
        super().__init__(f"cannot read shard {where}: {reason}")
        self.url, self.member = url, member


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
}


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
            batch[key] = torch.from_numpy(np.stack(values))
        elif isinstance(first, (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


# ---------------------------------------------------------------- reading
def read_segment(url: str, segment: Segment, storage_options: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Raw samples (undecoded bytes) [start, stop) of one shard. Raises ShardError naming url and member.

    Members are grouped into samples by key as webdataset does (consecutive
    members sharing `base_plus_ext`'s key), inline for speed.
    """
    member, sample, position = None, None, 0
    try:
        with fsspec.open(url, "rb", **storage_options) as stream:
            for item in tar_file_iterator(
                stream, skip_meta=None
            ):  # no per-member regex; keyless names are skipped below
                member = item["fname"]
                key, ext = base_plus_ext(member)
                if key is None:
                    continue
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        if position >= segment.start:
                            yield sample
                        position += 1
                        if position >= segment.stop:
                            return
                    sample = {"__key__": key, "__url__": url}
                sample[ext.lower()] = item["data"]
        if sample is not None:
            if position >= segment.start:
                yield sample
            position += 1
    except FileNotFoundError:
        raise ShardError(url, None, "file not found") from None
    except Exception as err:  # tarfile, network and decoding errors all end here
        raise ShardError(url, member, f"{type(err).__name__}: {err}") from err
    if position < segment.stop:
        raise ShardError(url, member, f"has {position} samples, the index says at least {segment.stop}")


def shuffled(samples: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """A seeded shuffle buffer of `size` samples (size <= 1: no shuffling)."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class TaskStream(IterableDataset):
    """Batches of one task split for this rank (and, inside a DataLoader, for this worker).

    Deterministic given (seed, epoch, world size, number of workers). Use
    `set_epoch` before each epoch and `resume(n)` to skip the n batches this
    rank already consumed in the epoch (normally through `TaskLoader`).
    """

    def __init__(
        self,
        urls: Sequence[str],
        shard_sizes: Sequence[int],
        *,
        batch_size: int,
        mode: str = "train",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        shuffle_buffer: int = 1000,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if len(urls) != len(shard_sizes) or not urls:
            raise ValueError(f"need one sample count per shard URL, got {len(urls)} URLs and {len(shard_sizes)} counts")
        self.urls, self.shard_sizes = list(urls), [int(s) for s in shard_sizes]
        self.batch_size, self.mode, self.seed = batch_size, mode, seed
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.storage_options = dict(storage_options or {})
        self.transform, self.shuffle_buffer, self.on_error = transform, shuffle_buffer, on_error
        self.epoch, self.consumed = 0, 0
        self.plan()  # validates rank, world size and batch size now, not in a worker

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order and shuffle seed); starts it from its first batch."""
        self.epoch, self.consumed = epoch, 0

    def resume(self, consumed: int) -> None:
        """Skip the first `consumed` batches of the current epoch (already used before a restart)."""
        if not 0 <= consumed <= len(self):
            raise ValueError(f"cannot resume after {consumed} batches: the epoch has {len(self)}")
        self.consumed = consumed

    def plan(self) -> RankPlan:
        """This rank's share of the current epoch."""
        seed = self.seed if self.mode == "train" else None
        return plan_rank(
            self.shard_sizes,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            seed=seed,
            epoch=self.epoch,
        )

    def __len__(self) -> int:
        return self.plan().num_batches

    def _raw_samples(self, segments: Sequence[Segment]) -> Iterator[dict[str, Any]]:
        for seg in segments:
            url = self.urls[seg.shard]
            try:
                yield from read_segment(url, seg, self.storage_options)
            except ShardError as err:
                if self.on_error == "raise":
                    raise
                logger.warning("skipping the rest of a shard (%s); its rows become zero-weight padding", err)

    def _padding_row(self) -> dict[str, Any]:
        first = Segment(self.plan().order[0], 0, 1)
        return self._decode(next(read_segment(self.urls[first.shard], first, self.storage_options)))

    def _decode(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        sample = decode_sample(raw)
        return self.transform(sample) if self.transform else sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan()
        blocks = worker_blocks(plan.num_batches, workers)
        done, first_asked = replay_round_robin(blocks, self.consumed)
        worker = (first_asked + loader_worker) % workers  # so the resumed round robin continues the sequence
        block, skip = blocks[worker], done[worker]
        bs = self.batch_size
        raw = self._raw_samples(plan.segments(self.shard_sizes, block.start * bs, block.stop * bs))
        if self.mode == "train":
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
            raw = shuffled(raw, self.shuffle_buffer, rng)
        template = None
        padded = 0
        for b in range(len(block)):
            rows = list(itertools.islice(raw, bs))  # raw bytes: cheap to skip
            if b < skip:
                continue
            decoded = [self._decode(r) for r in rows]
            if len(decoded) < bs:
                if template is None:
                    template = decoded[0] if decoded else self._padding_row()
                padded += bs - len(decoded)
            weights = [1.0] * len(decoded) + [0.0] * (bs - len(decoded))
            yield collate(decoded + [template] * (bs - len(decoded)), weights)
        if padded and self.mode == "train":
            logger.debug("rank %d worker %d: %d padding rows this epoch", self.rank, worker, padded)


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


def open_task(
    sequence: TaskSequenceConfig,
    task_index: int,
    split: str,
    *,
    batch_size: int,
    mode: str,
    index: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> TaskStream:
    """A TaskStream over one split ("train" or "eval") of one task of `sequence`.

    Per-shard sample counts come from the sequence's index (`index` if already
    loaded); storage options from the sequence.
    """
    if not 0 <= task_index < len(sequence.tasks):
        raise ValueError(f"task_index must be in [0, {len(sequence.tasks)}), got {task_index}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    index = index if index is not None else sequence.load_index()
    urls = sequence.shard_urls(task_index, split)
    root = sequence.root.rstrip("/") + "/"
    sizes = []
    for url in urls:
        key = url[len(root) :] if sequence.root and url.startswith(root) else url
        entry = index["shards"].get(key)
        if entry is None:
            raise ValueError(f"shard {url} is not in the index {sequence.url(sequence.index)}")
        sizes.append(int(entry["samples"]))
    expected = getattr(sequence.tasks[task_index], split).samples
    if sum(sizes) != expected:
        raise ValueError(
            f"task {sequence.tasks[task_index].name!r} {split}: the spec says {expected} samples, "
            f"its shards hold {sum(sizes)}"
        )
    return TaskStream(urls, sizes, batch_size=batch_size, mode=mode, storage_options=sequence.storage_options, **kwargs)
