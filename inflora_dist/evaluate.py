"""Score a trained run on any task sequence, with the run's own evaluation, and write a metrics JSON.

    python -m inflora_dist.evaluate --run runs/demo --tasks shards/tasks.yaml [--out FILE] [key=value ...]
    torchrun --nproc_per_node 2 -m inflora_dist.evaluate --run-dir runs/demo --tasks ...
    deepspeed --num_gpus 8 --module inflora_dist.evaluate --run-dir runs/demo --tasks ...

(`--run-dir` is `--run` under a launcher: torchrun's and deepspeed's own parsers
would take `--run` as an abbreviation of their `--run-path`/`--run_path`.)

The model is the run's after its newest finished task (trained.py), in the
run's ZeRO stage and precision; the ranks share every eval split as training
does. Vision runs score each task of TASKS.yaml three ways, as the trainer's
matrices do: class-incremental (argmax over all learned heads),
task-incremental (the head of the run's task that holds the task's classes)
and nearest class mean; each task's classes must be classes the run has
learned, all in one of its tasks. LLM runs generate greedily and score each
task by its own spec (exact match of label words, or ROUGE-L): the tasks
need not be ones the run trained on. Overrides (OmegaConf dotlist) change
evaluation settings of the run's config, e.g. train.eval_batch_size=128 or
model.max_new_tokens=64.

The JSON holds each task's `scores` by matrix, their `average` (every task
alike) and `pooled`: the score over all eval samples of the scored tasks
together (each task weighted by its `eval_samples`), the InfLoRA paper's accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from inflora_dist import dist
from inflora_dist.config import LANGUAGE_MODEL_KINDS
from inflora_dist.data import TaskLoader, TaskSequenceConfig, load_task_sequence, open_task
from inflora_dist.data.build_shards import key_value_option
from inflora_dist.data.transforms import configured_transform
from inflora_dist.engine import exit_process, shutdown_distributed
from inflora_dist.errors import run_command
from inflora_dist.metrics import pooled_accuracies
from inflora_dist.trained import TrainedRun, add_run_arguments, configure_logging
from inflora_dist.workloads import score_task

logger = logging.getLogger(__name__)


def heads_for(tasks: TaskSequenceConfig, records: Sequence[dict[str, Any]], learned: int) -> list[int]:
    """For each task of `tasks` (classification), the index of the run's task whose head holds all its classes.

    Raises ValueError naming the task and the classes the run has not learned
    (among its first `learned` tasks), or that spread over several of its tasks.
    """
    owner = {c: j for j, r in enumerate(records[:learned]) for c in r["classes"] or []}
    heads = []
    for i, task in enumerate(tasks.tasks):
        classes = task.classes or []
        unknown = [c for c in classes if c not in owner]
        if unknown:
            raise ValueError(
                f"tasks[{i}] ({task.name!r}) has classes {unknown} that the run has not learned (its learned "
                f"classes: {sorted(owner)})"
            )
        spread = sorted({owner[c] for c in classes})
        if len(spread) > 1:
            raise ValueError(
                f"tasks[{i}] ({task.name!r}) mixes classes of the run's tasks {spread}: task-incremental scoring "
                "needs the classes of one head; split it into one task per head"
            )
        heads.append(spread[0])
    return heads


def evaluate(trained: TrainedRun, tasks: TaskSequenceConfig, batch_size: int) -> dict[str, Any]:
    """The scores (%) of `trained` on every task of `tasks`, by matrix, with their averages. Collective."""
    workload, cfg = trained.workload, trained.cfg
    vision = trained.cfg.model.kind not in LANGUAGE_MODEL_KINDS
    if vision and tasks.kind != "classification":
        raise ValueError(f"the run trained a classifier; {tasks.kind} tasks cannot be scored with it")
    if not vision and tasks.kind != "instruction":
        raise ValueError(f"the run trained a language model; {tasks.kind} tasks cannot be scored with it")
    heads = heads_for(tasks, trained.records, len(trained.learned)) if vision else list(range(len(tasks.tasks)))
    index = tasks.load_index()
    transform = configured_transform(cfg.data.eval_transform, cfg.model.image_size)  # as the run evaluated
    keys = [key.removesuffix("_matrix") for key in workload.matrices]
    scores: dict[str, list[float]] = {key: [] for key in keys}
    measured: dict[str, list[Any]] = {}  # what the method measures per task (GainLoRA: the mean gates)
    for i, task in enumerate(tasks.tasks):
        stream = open_task(tasks, i, "eval", batch_size=batch_size, mode="exact", seed=cfg.seed, index=index,
                           transform=transform, channels=cfg.model.channels)  # fmt: skip
        loader = TaskLoader(stream, num_workers=cfg.train.num_workers)
        bar = tqdm(total=len(loader), desc=f"evaluate {task.name}", disable=not dist.is_main_process(), leave=False,
                   dynamic_ncols=True)  # fmt: skip
        with bar, trained.method.evaluating(heads[i], trained.upto) as seen:
            values = score_task(workload, trained.engine, loader, heads[i], trained.upto, bar)  # collective
        for key, value in zip(keys, values, strict=True):
            scores[key].append(value)
        for key, value in seen.items():
            measured.setdefault(key, []).append(value)
    # The paper's accuracy: all eval samples of the scored tasks pooled, each task weighted by its eval samples
    # (the spec's count: open_task checked it against the index's count of the shards just read).
    counts = [t.eval.samples for t in tasks.tasks]
    return {
        "run": str(trained.run),
        "checkpoint": str(trained.checkpoint),
        "method": cfg.method,
        "learned_tasks": trained.learned,
        "tasks": [t.name for t in tasks.tasks],
        "task_metrics": [t.instruction.metric if t.instruction else "accuracy" for t in tasks.tasks],
        "scores": scores,
        "average": {key: sum(v) / len(v) for key, v in scores.items()},
        "eval_samples": counts,
        "pooled": {key: pooled_accuracies([v], counts)[0] for key, v in scores.items()},
        **measured,
    }


def format_report(result: dict[str, Any]) -> str:
    """The scores as a table: one row per task, then the pooled and the average row; one column per score."""
    keys = list(result["scores"])
    width = max(len(n) for n in [*result["tasks"], "average"])
    lines = [" ".join([f"{'task':<{width}}", *(f"{k:>{max(len(k), 7)}}" for k in keys)])]
    rows = [(n, [result["scores"][k][i] for k in keys]) for i, n in enumerate(result["tasks"])]
    if "pooled" in result:  # by eval samples (the paper's); "average" weighs every task alike
        rows.append(("pooled", [result["pooled"][k] for k in keys]))
    for name, values in [*rows, ("average", [result["average"][k] for k in keys])]:
        cells = (f"{v:>{max(len(k), 7)}.2f}" for k, v in zip(keys, values, strict=True))
        lines.append(" ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inflora_dist.evaluate", description=__doc__.split("\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--tasks", required=True, help="task-sequence YAML (any fsspec URL) whose eval splits to score")
    parser.add_argument("--out", default=None, help="metrics JSON to write (default: <run>/evaluation.json)")
    parser.add_argument("-o", "--storage-option", type=key_value_option, action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec storage option of the task sequence")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="evaluation settings of the run's config (key=value)")
    args = parser.parse_args(argv)
    configure_logging()
    tasks = load_task_sequence(args.tasks, storage_options=dict(args.storage_option) or None)
    trained = TrainedRun(args.run, args.checkpoint, args.overrides, workload_sequence=tasks)
    result = evaluate(trained, tasks, trained.cfg.train.eval_batch_size)
    if dist.is_main_process():
        out = Path(args.out or trained.run / "evaluation.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(format_report(result))
        logger.info("wrote %s", out)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    run_command(main, exit=exit_process)
