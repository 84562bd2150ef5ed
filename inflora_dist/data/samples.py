"""Write a few images of a task sequence's shards as PNG files: to look at the data, or to feed `predict`.

    python -m inflora_dist.data.samples runs/shards/demo_fmnist_5x2/tasks.yaml --out runs/demo/samples

writes `<task>-<class name>-<k>.png` for the first `--per-class` images of each
class of each task's `--split` (eval by default), in shard order.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inflora_dist.data.reader import TaskLoader, open_task
from inflora_dist.data.spec import TaskSequenceConfig, load_task_sequence


def write_sample_images(
    seq: TaskSequenceConfig, out: str | Path, per_class: int = 1, split: str = "eval"
) -> list[Path]:
    """The first `per_class` images of every class of every task of `seq` as PNG files in `out`; their paths."""
    from PIL import Image

    if seq.kind != "classification":
        raise ValueError(f"sample images need a classification sequence, this one is {seq.kind}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for t, task in enumerate(seq.tasks):
        names = dict(zip(task.classes or [], task.class_names or [], strict=False))
        counts = dict.fromkeys(task.classes or [], 0)
        loader = TaskLoader(open_task(seq, t, split, batch_size=64, mode="exact", rank=0, world_size=1))
        for batch in loader:
            images = next(batch[k] for k in ("npy", "jpg", "jpeg", "png") if k in batch)
            for image, label, weight in zip(images, batch["cls"].tolist(), batch["weight"].tolist(), strict=True):
                if weight == 0 or counts.get(label, per_class) >= per_class:
                    continue
                name = re.sub(r"[^0-9A-Za-z]+", "_", names.get(label, f"class{label}")).strip("_")
                path = out / f"{task.name}-{name}-{counts[label]}.png"
                Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
                counts[label] += 1
                written.append(path)
            if all(n >= per_class for n in counts.values()):
                break
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inflora_dist.data.samples", description=__doc__.split("\n")[0])
    parser.add_argument("tasks", help="task-sequence YAML (any fsspec URL)")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    parser.add_argument("--per-class", type=int, default=1, help="images per class (1)")
    parser.add_argument("--split", choices=("train", "eval"), default="eval")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")
    paths = write_sample_images(load_task_sequence(args.tasks), args.out, args.per_class, args.split)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
