"""Use a trained run: classify images, or answer prompts.

    python -m inflora_dist.predict --run runs/demo shoe.png bag.jpg [--top-k 3]
    python -m inflora_dist.predict --run runs/demo photos/     # every image file in the folder
    python -m inflora_dist.predict --run runs/demo_llm --prompt "Which language is this sentence in? ..."
    python -m inflora_dist.predict --run runs/demo_llm --prompts questions.jsonl > answers.jsonl

A vision run prints one line per image (a folder stands for the image files
directly in it, by name): the path, the predicted class's name
(the task spec's `class_names`, else `class <id>`) and its probability, the
softmax over every class the run has learned (class-incremental prediction:
no task id is needed); `--top-k` adds the runners-up. An LLM run prints the
greedy answer to each `--prompt`; a JSONL file of `{"prompt": ..., "task":
...}` records (`task`: the run's task whose system prompt to use) gives a
JSONL of `{"prompt", "answer"}`. The model is the run's after its newest
finished task (trained.py); only safetensors, JSON and YAML are read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from inflora_dist.config import LANGUAGE_MODEL_KINDS
from inflora_dist.data.images import read_image
from inflora_dist.data.transforms import Transform, configured_transform
from inflora_dist.engine import exit_process, shutdown_distributed
from inflora_dist.errors import run_command
from inflora_dist.trained import TrainedRun, add_run_arguments

logger = logging.getLogger(__name__)

#: Suffixes (any case) of the files a folder argument stands for.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(paths: Sequence[str]) -> list[str]:
    """`paths` with each folder replaced by the image files directly in it (IMAGE_SUFFIXES, any case), sorted by
    name; other paths are kept as given. A folder holding no image file is a ValueError naming it."""
    out = []
    for path in paths:
        if not Path(path).is_dir():
            out.append(path)
            continue
        files = sorted(f for f in Path(path).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise ValueError(f"folder {path} holds no image file ({' '.join(IMAGE_SUFFIXES)})")
        out += [str(f) for f in files]
    return out


def image_batch(path: str | Path, channels: int, transform: Transform | None = None) -> torch.Tensor:
    """An image file as uint8 (1, H, W) for a one-channel model, else (1, H, W, 3): what the model preprocesses
    (data.images.read_image: 16-bit scaled, other modes converted, unreadable files refused by name), through
    the run's eval transform (data.eval_transform) when it names one."""
    pixels = read_image(path, channels)
    if transform is not None:
        pixels = transform.pixels(Image.fromarray(pixels), 0, 0, str(path))  # an eval recipe draws nothing
    return torch.from_numpy(pixels.copy()).unsqueeze(0)


def classify(trained: TrainedRun, paths: Sequence[str], top_k: int = 1) -> list[list[tuple[str, float]]]:
    """For each image, the `top_k` (class name, probability) pairs over every learned class, best first."""
    workload = trained.workload
    named = zip(workload.class_ids, workload.class_names, strict=True)
    names = [name or f"class {c}" for c, name in named][: workload.offsets[trained.upto + 1]]
    transform = configured_transform(trained.cfg.data.eval_transform, trained.cfg.model.image_size)
    out = []
    with torch.no_grad():
        for path in paths:
            image = image_batch(path, workload.model.channels, transform).to(trained.device)
            probs = torch.softmax(trained.engine(image, upto=trained.upto).float(), dim=1)[0]
            top = probs.topk(min(top_k, len(names)))
            out.append([(names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)])
    return out


def answer(trained: TrainedRun, rows: Sequence[dict[str, str]], max_new_tokens: int) -> list[str]:
    """Greedy answers to `rows` ({"prompt", "task"}), in batches of the run's eval batch size."""
    known = {r["name"] for r in trained.records}
    for row in rows:
        if row.get("task") and row["task"] not in known:
            raise ValueError(f"task {row['task']!r} is not one of the run's tasks {sorted(known)}")
    size = trained.cfg.train.eval_batch_size
    answers: list[str] = []
    with torch.no_grad():
        for start in range(0, len(rows), size):
            answers += trained.workload.generate(trained.engine, rows[start : start + size], max_new_tokens)
    return answers


def _prompt_rows(args: argparse.Namespace) -> list[dict[str, str]]:
    rows = [{"prompt": p, "task": args.task or ""} for p in args.prompt]
    if args.prompts:
        for n, line in enumerate(Path(args.prompts).read_text().splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{args.prompts}:{n}: expected a JSON object with a string 'prompt'")
                rows.append({"prompt": record["prompt"], "task": record.get("task") or args.task or ""})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inflora_dist.predict", description=__doc__.split("\n")[0])
    add_run_arguments(parser)
    parser.add_argument("images", nargs="*", help="image files, or folders of them, to classify (vision runs)")
    parser.add_argument("--top-k", type=int, default=1, help="classes to print per image (1)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt to answer (LLM runs); repeatable")
    parser.add_argument("--prompts", default=None, help='JSONL of {"prompt": ..., "task": ...} to answer')
    parser.add_argument("--task", default=None, help="the run's task whose system prompt the prompts use")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length (the run's max_new_tokens)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prompting = bool(args.prompt or args.prompts)
    if prompting == bool(args.images):
        parser.error("give image files (a vision run) or --prompt/--prompts (an LLM run)")
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    try:
        args.images = image_paths(args.images)
    except ValueError as err:
        parser.error(str(err))
    missing = [p for p in [*args.images, *([args.prompts] if args.prompts else [])] if not Path(p).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's start-up prints: stdout carries the results
        trained = TrainedRun(args.run, args.checkpoint)
    llm = trained.cfg.model.kind in LANGUAGE_MODEL_KINDS
    if llm != prompting:
        kind = "an LLM" if llm else "a vision"
        parser.error(f"{args.run} is {kind} run: give {'--prompt/--prompts' if llm else 'image files'}")
    if llm:
        rows = _prompt_rows(args)
        answers = answer(trained, rows, args.max_new_tokens or trained.cfg.model.max_new_tokens)
        for row, text in zip(rows, answers, strict=True):
            print(json.dumps({"prompt": row["prompt"], "answer": text}) if args.prompts else text)
    else:
        for path, best in zip(args.images, classify(trained, args.images, args.top_k), strict=True):
            print("\t".join([path, *(f"{name}\t{p:.4f}" for name, p in best)]))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    run_command(main, exit=exit_process)
