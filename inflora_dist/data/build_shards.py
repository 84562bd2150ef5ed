"""Build a task sequence as webdataset shards, plus its index and task-sequence YAML.

    python -m inflora_dist.data.build_shards fashion-mnist --out runs/shards/fmnist --tasks 5 --classes-per-task 2
    python -m inflora_dist.data.build_shards arrays --train-images x.npy --train-labels y.npy ... --out s3://b/x
    python -m inflora_dist.data.build_shards imagefolder --root imagenet-r --tasks 10 --classes-per-task 20 ...
    python -m inflora_dist.data.build_shards records a.jsonl b.parquet c.csv saved_dataset/ --out runs/shards/text
    python -m inflora_dist.data.build_shards llm-demo --out runs/shards/llm_demo --per-label 40
    python -m inflora_dist.data.build_shards olora --root /data/O-LoRA/CL_Benchmark --order order1 --out ...
    python -m inflora_dist.data.build_shards superni --root /data/gainlora/CL_Benchmark --order order1 --out ...

Writes under --out (any fsspec URL): `train/<task>-NNNNNN.tar`, `eval/<task>-NNNNNN.tar`,
`index.json` (per shard: samples, bytes, sha256; per task: samples per split)
and `tasks.yaml` (the task sequence, with `root` set to --out).

Each source's reader is a module of inflora_dist.data.sources (or data/olora.py, data/superni.py,
data/instruction_sources.py); this module is the command line and the writing of shards, index and sequence.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from inflora_dist.config import to_yaml
from inflora_dist.data import superni
from inflora_dist.data.instruction_sources import demo_sequence
from inflora_dist.data.olora import ORDERS, records_for_build
from inflora_dist.data.shards import ShardInfo, ShardWriter, write_index, write_small_file
from inflora_dist.data.sources.arrays import load_array
from inflora_dist.data.sources.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_fashion_mnist,
    read_idx,
)
from inflora_dist.data.sources.image_folder import (
    IMAGE_SUFFIXES,
    EncodedImage,
    ImageFolder,
    image_folder_data,
    split_by_class,
)
from inflora_dist.data.sources.records import RECORD_FORMATS, read_records
from inflora_dist.data.spec import (
    METRICS,
    InstructionSpec,
    SplitSpec,
    TaskSequenceConfig,
    TaskSpec,
    check_path_component,
    validate,
)
from inflora_dist.errors import run_command
from inflora_dist.runlock import RunLock

__all__ = [  # the sources' readers stay importable from here
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_SUFFIXES",
    "RECORD_FORMATS",
    "ImageFolder",
    "build_classification",
    "build_from_config",
    "build_instruction",
    "image_folder_data",
    "key_value_option",
    "load_array",
    "load_fashion_mnist",
    "main",
    "read_idx",
    "read_records",
    "split_by_class",
    "split_classes",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- builders
#: `--class-order` values besides a file: the dataset's own order (sorted ids, as the reference keeps it with
#: `"shuffle": false`), or a seeded shuffle.
CLASS_ORDERS = ("dataset", "shuffled")


def split_classes(
    classes: Sequence[int],
    num_tasks: int,
    classes_per_task: int,
    seed: int,
    order: str = "shuffled",
    class_names: Sequence[str] | None = None,
) -> list[list[int]]:
    """The classes in `order` cut into `num_tasks` tasks of `classes_per_task` classes, in sequence.

    `order`: "dataset" (sorted ids), "shuffled" (a seeded shuffle; each task's ids sorted) or the path of a
    class order file (`read_class_order`: ids or names, kept as listed within each task)."""
    if order == "dataset":
        ordered = sorted(classes)
    elif order == "shuffled":
        ordered = sorted(classes)
        random.Random(seed).shuffle(ordered)
    else:
        ordered = read_class_order(order, class_names)
        unknown = sorted(set(ordered) - set(classes))
        repeated = sorted(c for c, n in Counter(ordered).items() if n > 1)
        if unknown or repeated:
            raise ValueError(f"class order file {order}: ids not in the data {unknown}, listed twice {repeated}")
    if num_tasks * classes_per_task > len(ordered):
        raise ValueError(
            f"{num_tasks} tasks x {classes_per_task} classes need {num_tasks * classes_per_task} classes, "
            f"the {'class order' if order not in CLASS_ORDERS else 'data'} has {len(ordered)}"
        )
    tasks = [ordered[i * classes_per_task : (i + 1) * classes_per_task] for i in range(num_tasks)]
    return [sorted(t) for t in tasks] if order == "shuffled" else tasks


def read_class_order(path: str | Path, class_names: Sequence[str] | None = None) -> list[int]:
    """A class order file: a YAML or JSON list, or one entry per line, of class ids, or of class names where
    the source names its classes. Raises ValueError naming the file and an entry it cannot place."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise FileNotFoundError(f"class order file {path}: {err.strerror or err}") from None
    try:
        entries = yaml.safe_load(text) if text.lstrip().startswith("[") else [e.strip() for e in text.splitlines()]
    except yaml.YAMLError as err:
        raise ValueError(f"class order file {path}: not a YAML list ({err})") from None
    order = []
    for entry in (e for e in entries if str(e).strip()):
        if isinstance(entry, int) or str(entry).isdigit():
            order.append(int(entry))
        elif class_names is not None and str(entry) in class_names:
            order.append(list(class_names).index(str(entry)))
        else:
            raise ValueError(f"class order file {path}: {entry!r} is neither a class id nor a class name")
    return order


def _pick(labels: np.ndarray, classes: Sequence[int], per_class: int | None, rng: random.Random) -> list[int]:
    """Indices of up to `per_class` samples of each class (seeded), shuffled together."""
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c).tolist()
        rng.shuffle(idx)
        picked.extend(idx[:per_class] if per_class is not None else idx)
    rng.shuffle(picked)
    return picked


def _write_split(
    out: str, prefix: str, samples: Sequence[dict[str, Any]], shard_size: int, storage_options: Mapping, bar: tqdm
) -> list[ShardInfo]:
    with ShardWriter(out, prefix, shard_size, storage_options) as writer:
        for sample in samples:
            writer.write(sample)
            bar.update(1)
    return writer.shards


def _finish(out: str, config: TaskSequenceConfig, shards: list[ShardInfo], storage_options: Mapping) -> None:
    validate(config)
    tasks = {t.name: {"train": t.train.samples, "eval": t.eval.samples} for t in config.tasks}
    write_index(out, shards, tasks, storage_options)
    write_small_file(out, "tasks.yaml", to_yaml(config), storage_options)


def _image_sample(key: str, image: np.ndarray | EncodedImage, label: int) -> dict[str, Any]:
    # Arrays are stored exactly (.npy); encoded images (ImageFolder) as they were encoded, under their format.
    if isinstance(image, EncodedImage):
        return {"__key__": key, image.field: image.data, "cls": label}
    return {"__key__": key, "npy": image, "cls": label}


def _split_spec(shards: list[ShardInfo]) -> SplitSpec:
    return SplitSpec(shards=[s.path for s in shards], samples=sum(s.samples for s in shards))


def build_classification(
    train: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
    out: str,
    *,
    num_tasks: int,
    classes_per_task: int,
    seed: int = 0,
    train_per_class: int | None = None,
    eval_per_class: int | None = None,
    shard_size: int = 1000,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    class_order: str = "shuffled",
) -> TaskSequenceConfig:
    """A class-incremental sequence from (images, labels); returns the written task sequence.

    `class_names[c]` names class id c (written to each task's `class_names`); `class_order` orders the
    classes into tasks (`split_classes`).

    `images` is an array (samples stored as `.npy`) or anything indexable
    giving `EncodedImage`s, such as ImageFolder (stored as encoded). Each sample
    is `{"__key__": "<split>-<source index>", "npy" or "jpg", "png", ...: image, "cls": label}`.
    """
    storage_options = dict(storage_options or {})
    (x_train, y_train), (x_eval, y_eval) = train, evaluation
    if len(x_train) != len(y_train) or len(x_eval) != len(y_eval):
        raise ValueError("images and labels differ in length")
    task_classes = split_classes(np.unique(y_train).tolist(), num_tasks, classes_per_task, seed, class_order,
                                 class_names)  # fmt: skip
    rng = random.Random(seed)
    plan = []
    for i, classes in enumerate(task_classes):
        tr = _pick(y_train, classes, train_per_class, rng)
        ev = _pick(y_eval, classes, eval_per_class, rng)
        plan.append((f"task{i}", classes, tr, ev))
    config = TaskSequenceConfig(kind="classification", scenario="class_incremental", root=out, index="index.json")
    all_shards: list[ShardInfo] = []
    total = sum(len(tr) + len(ev) for _, _, tr, ev in plan)
    with tqdm(total=total, desc="writing shards", unit="sample", disable=not progress) as bar:
        for name, classes, tr, ev in plan:
            splits = {}
            for split, x, y, idx in (("train", x_train, y_train, tr), ("eval", x_eval, y_eval, ev)):
                samples = (_image_sample(f"{split}-{j:06d}", x[j], int(y[j])) for j in idx)
                shards = _write_split(out, f"{split}/{name}", list(samples), shard_size, storage_options, bar)
                splits[split] = _split_spec(shards)
                all_shards.extend(shards)
            names = [class_names[c] for c in classes] if class_names else None
            config.tasks.append(
                TaskSpec(name=name, classes=classes, class_names=names, train=splits["train"], eval=splits["eval"])
            )
    _finish(out, config, all_shards, storage_options)
    return config


def build_instruction(
    records: Mapping[str, Sequence[Mapping[str, str]]],
    out: str,
    *,
    eval_fraction: float = 0.1,
    eval_records: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
    metrics: Mapping[str, str] | None = None,
    seed: int = 0,
    shard_size: int = 1000,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TaskSequenceConfig:
    """An instruction-tuning sequence, one task per key of `records` (in order).

    Each sample is `{"__key__": "<task>-<n>", "json": {"prompt", "response", "task"}}`. A seeded
    `eval_fraction` of each task is held out; with `eval_records` (the same tasks: e.g. a benchmark's own
    test split) all of `records` is trained on and `eval_records` is the eval split, `eval_fraction` unused.
    Exact-match tasks list their distinct responses (of both splits) as labels.
    """
    storage_options = dict(storage_options or {})
    metrics = dict(metrics or {})
    if eval_records is None and not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if eval_records is not None and list(eval_records) != list(records):
        raise ValueError(f"eval_records name tasks {list(eval_records)}, records name {list(records)}: they must match")
    unknown = set(metrics) - set(records)
    if unknown:
        raise ValueError(f"metrics name tasks that do not exist: {sorted(unknown)}; tasks are {list(records)}")
    rng = random.Random(seed)
    config = TaskSequenceConfig(kind="instruction", scenario="task_incremental", root=out, index="index.json")
    all_shards: list[ShardInfo] = []
    total = sum(map(len, records.values())) + sum(map(len, (eval_records or {}).values()))
    with tqdm(total=total, desc="writing shards", unit="sample", disable=not progress) as bar:
        for name, items in records.items():
            check_path_component(name, "task name")
            metric = metrics.get(name, "exact_match")
            if metric not in METRICS:
                raise ValueError(f"metric for task {name!r} must be one of {METRICS}, got {metric!r}")
            if eval_records is None:
                order = list(range(len(items)))
                rng.shuffle(order)
                n_eval = max(1, round(len(items) * eval_fraction))
                if len(items) - n_eval < 1:
                    raise ValueError(f"task {name!r} has {len(items)} records: too few to hold out an eval split")
                pool, parts = list(items), (("train", order[n_eval:]), ("eval", order[:n_eval]))
            else:
                held = list(eval_records[name])
                if not items or not held:
                    raise ValueError(f"task {name!r} has {len(items)} train and {len(held)} eval records: need both")
                pool = [*items, *held]  # eval keys continue after the train ones: "<task>-<n>" stays unique
                parts = (("train", range(len(items))), ("eval", range(len(items), len(pool))))
            splits = {}
            for split, idx in parts:
                samples = [{"__key__": f"{name}-{j:08d}", "json": {**pool[j], "task": name}} for j in idx]
                shards = _write_split(out, f"{split}/{name}", samples, shard_size, storage_options, bar)
                splits[split] = _split_spec(shards)
                all_shards.extend(shards)
            labels = sorted({r["response"] for r in pool}) if metric == "exact_match" else []
            spec = InstructionSpec(metric=metric, labels=labels)
            config.tasks.append(TaskSpec(name=name, train=splits["train"], eval=splits["eval"], instruction=spec))
    _finish(out, config, all_shards, storage_options)
    return config


# ---------------------------------------------------------------- CLI
def key_value_option(text: str) -> tuple[str, Any]:
    """An argparse KEY=VALUE option; the value is parsed as JSON when it is JSON (numbers, booleans)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inflora_dist.data.build_shards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--out", required=True, help="output URL: a local path, file://, s3://...")
        s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
        s.add_argument("--seed", type=int, default=0, help="seed of the class order and sample selection")
        s.add_argument(
            "-o", "--storage-option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
            help="fsspec storage option, e.g. -o endpoint_url=http://127.0.0.1:9000 (repeatable)",
        )  # fmt: skip
        s.add_argument("--quiet", action="store_true", help="no progress bar")

    def metric_option(s: argparse.ArgumentParser) -> None:
        s.add_argument(
            "--metric", type=key_value_option, action="append", default=[], metavar="TASK=METRIC",
            help=f"scoring of a task, one of {METRICS} (default exact_match)",
        )  # fmt: skip

    def classification(s: argparse.ArgumentParser, order: str = "dataset") -> None:
        common(s)
        s.add_argument(
            "--class-order", default=order, metavar="dataset|shuffled|FILE",
            help=f"classes into tasks: the dataset's order (sorted ids), a --seed shuffle, or a file listing ids or "
            f"names (default {order})",
        )  # fmt: skip
        s.add_argument("--tasks", type=int, required=True, help="number of tasks")
        s.add_argument("--classes-per-task", type=int, required=True)
        s.add_argument("--train-per-class", type=int, default=None, help="training samples per class (default all)")
        s.add_argument("--eval-per-class", type=int, default=None, help="eval samples per class (default all)")

    fm = sub.add_parser("fashion-mnist", help="Fashion-MNIST IDX files -> class-incremental tasks")
    fm.add_argument("--source", default=FASHION_MNIST_DIR, help=f"directory of the IDX files ({FASHION_MNIST_DIR})")
    classification(fm, order="shuffled")  # the demo's tasks
    im = sub.add_parser("imagefolder", help="one sub-folder of images per class -> class-incremental tasks")
    im.add_argument(
        "--root", required=True,
        help="folder with one sub-folder per class (e.g. ImageNet-R), or with train/ and test/ of them, or the "
        "root of the split files' relative paths",
    )  # fmt: skip
    im.add_argument("--eval-root", default=None, help="a separate eval folder; else --eval-fraction of --root")
    im.add_argument("--train-split", default=None, help="split file {data: [paths], targets: [ids]} (YAML/JSON)")
    im.add_argument("--eval-split", default=None, help="the eval split's file, with --train-split")
    im.add_argument(
        "--eval-fraction", type=float, default=0.2, help="seeded eval share of each class when no split (0.2)"
    )
    im.add_argument(
        "--max-side", type=int, default=None,
        help="shrink images whose longer side exceeds this (re-encoded); default: every file's bytes as they are",
    )  # fmt: skip
    classification(im)
    ar = sub.add_parser("arrays", help=".npy image and label arrays -> class-incremental tasks")
    for name in ("train-images", "train-labels", "eval-images", "eval-labels"):
        ar.add_argument(f"--{name}", required=True, help=f"{name.replace('-', ' ')} (.npy)")
    ar.add_argument("--class-names", default=None, help="comma-separated names of class ids 0, 1, ... (optional)")
    classification(ar)
    js = sub.add_parser(
        "records", aliases=["jsonl"], help=f"prompt/response records -> instruction tasks: {RECORD_FORMATS}"
    )
    js.add_argument("files", nargs="+", help="one task per file or folder, unless --task-field is given")
    js.add_argument("--task-field", default=None, help="the record field naming the task")
    js.add_argument("--prompt-field", default="prompt")
    js.add_argument("--response-field", default="response")
    js.add_argument("--split", default=None, help="the split of a saved DatasetDict (e.g. train)")
    js.add_argument("--eval-fraction", type=float, default=0.1)
    metric_option(js)
    common(js)
    demo = sub.add_parser(
        "llm-demo", help="3 instruction tasks from packaged text (chatterbot-corpus: language, question, chat topic)"
    )
    demo.add_argument("--per-label", type=int, default=40, help="records per label word (default 40, at most 42)")
    demo.add_argument("--eval-fraction", type=float, default=0.2)
    metric_option(demo)
    common(demo)
    ol = sub.add_parser("olora", help="O-LoRA's CL benchmark (CL_Benchmark/ on your disk) in one of its task orders")
    ol.add_argument("--root", required=True, help="the CL_Benchmark folder of the O-LoRA repository")
    ol.add_argument("--order", required=True, choices=sorted(ORDERS), help="order1-3: standard (4 tasks), 4-6: long")
    ol.add_argument("--max-train-per-task", type=int, default=None, help="seeded subset of train.json (default all)")
    ol.add_argument("--max-eval-per-task", type=int, default=None, help="seeded subset of test.json (default all)")
    common(ol)
    sn = sub.add_parser(
        "superni", help="GainLoRA's CL benchmark (CL_Benchmark/ on your disk): SuperNI orders 1-2, Long_Sequence 3-4"
    )
    sn.add_argument("--root", required=True, help="the CL_Benchmark folder of the GainLoRA repository")
    sn.add_argument("--order", required=True, choices=sorted(superni.ORDERS), help="order1-2: SuperNI, 3-4: long")
    sn.add_argument("--num-tasks", type=int, default=None, help="the order's first tasks only (default all 15)")
    sn.add_argument(
        "--tasks", default=None, metavar="TASK,TASK,...",
        help="a subset of the order's tasks, comma-separated, trained in the order's sequence (not with --num-tasks)",
    )  # fmt: skip
    sn.add_argument("--max-train-per-task", type=int, default=None, help="seeded subset of train.json (default all)")
    sn.add_argument("--max-eval-per-task", type=int, default=None, help="seeded subset of test.json (default all)")
    common(sn)
    return p


def build_from_config(build: Mapping[str, Any], out: Path) -> TaskSequenceConfig:
    """Build a run's `data.build` into `out`: its `source` (default fashion-mnist) is the command, every other
    key an option (`per_class: 40` -> `--per-class 40`), as on the command line; a list is one comma-separated
    value (`tasks: [a, b]` -> `--tasks a,b`) and a null key is left out (the option's default).

    source superni: `root` is required and checked (with the tasks selected) before any work, in errors that name
    `data.build.root`."""
    source = build.get("source", "fashion-mnist")
    options = {k: v for k, v in build.items() if k != "source" and v is not None}
    if source == "superni" and options.get("order") is not None:  # no order: the command line names --order
        order, tasks = str(options["order"]), options.get("tasks")
        tasks = tasks if tasks is None or isinstance(tasks, str) else [str(t) for t in tasks]
        selected = superni.select_tasks(order, tasks, options.get("num_tasks"))
        superni.check_root(options.get("root"), order, selected, key="data.build.root")
    args = [source, "--out", str(out), "--quiet"]
    for k, v in options.items():
        if isinstance(v, Sequence) and not isinstance(v, str):
            v = ",".join(str(x) for x in v)
        args += [f"--{k.replace('_', '-')}", str(v)]
    logger.info("building the task sequence: build_shards %s", " ".join(args))
    return main(args)


def main(argv: Sequence[str] | None = None) -> TaskSequenceConfig:
    """Entry point of `python -m inflora_dist.data.build_shards`.

    A local `--out` folder is locked while it is built (runlock.RunLock, as a run directory is): a second
    build into it stops at once naming the folder and the holder.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "://" in args.out and not args.out.startswith("file://"):
        return _build(args)  # an object store has no O_EXCL file to lock with
    out = Path(args.out.removeprefix("file://"))
    existed = out.exists()
    lock = RunLock(out, what="shard folder", holder="another build", advice="use another --out")
    lock.acquire()
    try:
        return _build(args)
    finally:
        lock.release()
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # made only to hold the lock of a build that wrote nothing


def _build(args: argparse.Namespace) -> TaskSequenceConfig:
    options = dict(args.storage_option)
    common = {"seed": args.seed, "shard_size": args.shard_size, "storage_options": options, "progress": not args.quiet}
    if args.command in ("olora", "superni"):
        limits = (args.max_train_per_task, args.max_eval_per_task, args.seed)
        if args.command == "olora":
            train, held_out, metrics = records_for_build(args.root, args.order, *limits)
        else:
            train, held_out, metrics = superni.records_for_build(
                args.root, args.order, *limits, args.num_tasks, args.tasks, root_key="--root"
            )
        config = build_instruction(train, args.out, eval_records=held_out, metrics=metrics, **common)
    elif args.command in ("records", "jsonl", "llm-demo"):
        if args.command != "llm-demo":
            records = read_records(args.files, args.task_field, args.prompt_field, args.response_field, args.split)
            metrics = dict(args.metric)
        else:
            records, metrics = demo_sequence(args.per_label, args.seed)
            metrics.update(args.metric)
        config = build_instruction(records, args.out, eval_fraction=args.eval_fraction, metrics=metrics, **common)
    else:
        if args.command == "fashion-mnist":
            data, names = load_fashion_mnist(args.source), FASHION_MNIST_CLASSES
        elif args.command == "imagefolder":
            data = image_folder_data(
                args.root, args.eval_root, eval_fraction=args.eval_fraction, seed=args.seed,
                num_tasks=args.tasks, classes_per_task=args.classes_per_task, max_side=args.max_side,
                train_split=args.train_split, eval_split=args.eval_split,
            )  # fmt: skip
            names = data.pop("class_names")
        else:
            keys = ("train_images", "train_labels", "eval_images", "eval_labels")
            data = {k: load_array(getattr(args, k)) for k in keys}
            names = args.class_names.split(",") if args.class_names else None
        config = build_classification(
            (data["train_images"], data["train_labels"]),
            (data["eval_images"], data["eval_labels"]),
            args.out,
            num_tasks=args.tasks,
            classes_per_task=args.classes_per_task,
            train_per_class=args.train_per_class,
            eval_per_class=args.eval_per_class,
            class_names=names,
            class_order=args.class_order,
            **common,
        )
    logger.info("wrote %d tasks to %s (task sequence: %s)", len(config.tasks), args.out, config.url("tasks.yaml"))
    return config


if __name__ == "__main__":
    run_command(main)
