"""Read throughput of the data layer against a plain sequential tarfile read of the same shards.

    python -m inflora_dist.data.bench [--samples 20000] [--shard-size 1000] [--batch-size 256] [--json]

Builds Fashion-MNIST shards (Debian package dataset-fashion-mnist) in a temp
dir, then measures, side by side in one run and best of --repeats:
  * raw:   tarfile.open(mode="r|") over every shard, reading each member's bytes;
  * local: TaskStream (webdataset tar iteration, decoding, batching, every sample's bytes verified
           against the index's digest) on the same files;
  * local_unverified: the same without the digests (verify_cost = 1 - unverified / verified time: the hashing);
  * s3:    TaskStream on the same shards through a local S3 API (moto_server on 127.0.0.1), verified.
local_ratio = local samples/s / raw samples/s (our overhead over the raw read, verification on; goal >= 0.8).

Then the images of the reference's pipeline: --images full-size JPEGs (500 x 375, ImageNet-R's typical size,
smooth random content, quality 90) built into shards as `imagefolder` keeps them, read by one process (what
one DataLoader worker does) decoding each and applying data.train_transform / data.eval_transform's ImageNet-R
recipes at 224 px: `train_images_per_s_per_worker`, `eval_images_per_s_per_worker`.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np

from inflora_dist.data.build_shards import build_classification, load_fashion_mnist
from inflora_dist.data.build_shards import main as main_build
from inflora_dist.data.reader import TaskLoader, open_task
from inflora_dist.data.spec import TaskSequenceConfig, load_task_sequence
from inflora_dist.data.transforms import Transform, build_transform


def _best(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - start)
    return best, count


def raw_read(paths: list[str]) -> int:
    """Samples in `paths` by plain tarfile streaming (member bytes read, nothing decoded)."""
    keys = 0
    last = None
    for path in paths:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                tar.extractfile(member).read()
                key = member.name.rsplit(".", 1)[0]
                keys += key != last
                last = key
    return keys


def stream_read(seq: TaskSequenceConfig, batch_size: int, verify: bool = True) -> int:
    """Real samples through TaskStream in exact mode (`verify`: each sample checked against its digest)."""
    stream = open_task(seq, 0, "train", batch_size=batch_size, mode="exact", rank=0, world_size=1)
    if not verify:
        stream.digests = None
    return sum(int(b["weight"].sum()) for b in TaskLoader(stream))


def image_read(seq: TaskSequenceConfig, batch_size: int, transform: Transform) -> int:
    """Images through TaskStream in one process, decoded and transformed (`transform`), as one loader worker."""
    stream = open_task(seq, 0, "train", batch_size=batch_size, mode="train", seed=0, rank=0, world_size=1,
                       transform=transform, channels=3)  # fmt: skip
    return sum(int(b["weight"].sum()) for b in TaskLoader(stream))


def full_size_jpegs(root: Path, count: int, size: tuple[int, int] = (500, 375)) -> None:
    """`count` JPEGs of `size` in two class folders under `root`: smooth random images (upsampled noise), which
    JPEG compresses about as much as photographs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        noise = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8))
        noise.resize(size, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def transform_figures(tmp: Path, count: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Decoded-and-transformed images per second in one process (one loader worker), train and eval recipes."""
    full_size_jpegs(tmp / "jpegs", count)
    main_build(["imagefolder", "--root", str(tmp / "jpegs"), "--out", str(tmp / "jpeg_shards"), "--tasks", "1",
                "--classes-per-task", "2", "--eval-fraction", "0.1", "--quiet"])  # fmt: skip
    seq = load_task_sequence(str(tmp / "jpeg_shards" / "tasks.yaml"))
    figures = {}
    for view in ("train", "eval"):
        transform = build_transform(f"imagenet_r_{view}", 224)
        seconds, n = _best(lambda t=transform: image_read(seq, batch_size, t), repeats)
        figures[f"{view}_images_per_s_per_worker"] = round(n / seconds, 1)
    return figures


def main(argv: list[str] | None = None) -> dict:
    """Entry point of `python -m inflora_dist.data.bench`; returns the figures."""
    p = argparse.ArgumentParser(prog="python -m inflora_dist.data.bench", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20000, help="training samples in the benchmark task")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-s3", action="store_true", help="skip the S3 measurement")
    p.add_argument("--images", type=int, default=256, help="full-size JPEGs for the transform figures (0: skip)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = p.parse_args(argv)

    data = load_fashion_mnist()
    per_class = args.samples // 10
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "shards")
        build_classification(
            (data["train_images"], data["train_labels"]),
            (data["eval_images"][:100], data["eval_labels"][:100]),
            out,
            num_tasks=1,
            classes_per_task=10,
            train_per_class=per_class,
            eval_per_class=1,
            shard_size=args.shard_size,
            progress=False,
        )
        seq = load_task_sequence(f"{out}/tasks.yaml")
        paths = seq.shard_urls(0, "train")
        megabytes = sum(Path(p).stat().st_size for p in paths) / 1e6
        raw_s, raw_n = _best(lambda: raw_read(paths), args.repeats)
        local_s, local_n = _best(lambda: stream_read(seq, args.batch_size), args.repeats)
        unverified_s, _ = _best(lambda: stream_read(seq, args.batch_size, verify=False), args.repeats)
        if raw_n != local_n:
            raise RuntimeError(f"raw read counted {raw_n} samples, the stream {local_n}")
        figures = {
            "samples": local_n,
            "megabytes": round(megabytes, 2),
            "raw_samples_per_s": round(raw_n / raw_s),
            "local_samples_per_s": round(local_n / local_s),
            "local_mb_per_s": round(megabytes / local_s, 1),
            "local_ratio": round(raw_s / local_s, 3),
            "local_unverified_ratio": round(raw_s / unverified_s, 3),
            "verify_cost": round(1 - unverified_s / local_s, 3),
        }
        if not args.no_s3:
            from inflora_dist.data.local_s3 import moto_s3

            with moto_s3(bucket="bench") as options:
                fs = fsspec.filesystem("s3", **options)
                fs.put(out, "bench/shards", recursive=True)
                remote = load_task_sequence("s3://bench/shards/tasks.yaml", storage_options=options)
                remote.root = "s3://bench/shards"
                s3_s, s3_n = _best(lambda: stream_read(remote, args.batch_size), args.repeats)
            figures.update(s3_samples_per_s=round(s3_n / s3_s), s3_mb_per_s=round(megabytes / s3_s, 1))
        else:
            figures["s3_samples_per_s"] = None
        if args.images:
            figures.update(transform_figures(Path(tmp), args.images, 64, args.repeats))

    print(f"{'reader':<8}{'samples/s':>12}{'MB/s':>10}")
    print(f"{'raw tar':<8}{figures['raw_samples_per_s']:>12}{megabytes / raw_s:>10.1f}")
    print(f"{'local':<8}{figures['local_samples_per_s']:>12}{figures['local_mb_per_s']:>10.1f}")
    print(f"{'local, not verified':<8}{round(local_n / unverified_s):>12}{megabytes / unverified_s:>10.1f}")
    if figures["s3_samples_per_s"] is not None:
        print(f"{'s3':<8}{figures['s3_samples_per_s']:>12}{figures['s3_mb_per_s']:>10.1f}")
    if args.images:
        print(f"one loader worker, {args.images} JPEGs of 500 x 375 decoded and transformed to 224 px (ImageNet-R "
              f"recipes): train {figures['train_images_per_s_per_worker']} images/s, eval "
              f"{figures['eval_images_per_s_per_worker']} images/s")  # fmt: skip
    met = "met" if figures["local_ratio"] >= 0.8 else "NOT met"
    print(f"local_ratio (ours / raw tarfile, verified) = {figures['local_ratio']} (goal >= 0.8: {met}); "
          f"verification costs {figures['verify_cost']:.1%} of the stream's time")  # fmt: skip
    if args.json:
        print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
