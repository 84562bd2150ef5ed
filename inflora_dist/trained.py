"""A trained run, rebuilt from its directory for evaluation and prediction.

    <run>/config.yaml                        the resolved config the run started with
    <run>/config_changes.json                the keys its resumes changed, and from where (run_record)
    <run>/checkpoints/NNNNNN-taskT-done/     its newest task-boundary checkpoint that verifies (or one named)

The config is the one in force when the checkpoint was written: config.yaml
with the changes recorded before the checkpoint's position (logged).

The model is assembled as the run assembled it (methods.assemble: pre-trained
weights from their local directory, the method's branch layers with the run's
stage slots, one head per task of the run), then the checkpoint's state is
loaded (methods.restore: adapters, heads, class statistics, the merged
branches added back): the model of the run after its last finished stage.
Only safetensors, JSON and YAML are read; nothing is unpickled (the
checkpoint's DeepSpeed engine files, mid-task only, are not touched).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from inflora_dist.checkpoint import CheckpointCorrupt, Checkpointer, read_state
from inflora_dist.config import LANGUAGE_MODEL_KINDS, RunConfig
from inflora_dist.data.spec import InstructionSpec, TaskSequenceConfig, TaskSpec
from inflora_dist.engine import build_inference_engine, init_distributed
from inflora_dist.methods import assemble, restore
from inflora_dist.run_record import describe, recorded_config
from inflora_dist.workloads import Workload

logger = logging.getLogger(__name__)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every command that reads a run: --run (alias --run-dir: under torchrun or deepspeed, whose
    own parsers take --run as an abbreviation of --run-path), --checkpoint, and the launcher's --local_rank."""
    parser.add_argument("--run", "--run-dir", dest="run", required=True, help="the run's output_dir")
    parser.add_argument("--checkpoint", default=None, help="a task-boundary checkpoint dir (default: the newest)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")


def configure_logging() -> None:
    """INFO lines from rank 0, warnings only from the others, each prefixed with its rank."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")  # fmt: skip


def task_boundary_checkpoint(run: Path) -> Path:
    """The newest `*-done` checkpoint of `run` that verifies; corrupt ones are skipped with a warning. Collective."""
    root = run / "checkpoints"
    candidates = [p for p in Checkpointer(root).complete() if p.name.endswith("-done")]
    if not candidates:
        raise FileNotFoundError(
            f"{root} holds no task-boundary checkpoint (*-done): the run has not finished its first task"
        )
    for path in reversed(candidates):
        try:
            Checkpointer.verify_once_per_node(path)  # collective
            return path
        except CheckpointCorrupt as err:
            logger.warning("skipping a corrupt checkpoint: %s", err)
    raise CheckpointCorrupt(f"none of the {len(candidates)} task-boundary checkpoints in {root} verifies")


def _run_sequence(records: list[dict[str, Any]], kind: str) -> TaskSequenceConfig:
    """The run's tasks as a sequence without data: what the model's heads and the class map are built from."""
    tasks = [
        TaskSpec(
            name=r["name"],
            classes=r.get("classes"),
            class_names=r.get("class_names"),
            instruction=InstructionSpec(**r["instruction"]) if r.get("instruction") else None,
        )
        for r in records
    ]
    return TaskSequenceConfig(kind="instruction" if kind in LANGUAGE_MODEL_KINDS else "classification", tasks=tasks)


class TrainedRun:
    """The model of a run directory after its last finished task, in an inference engine.

    `workload_sequence` replaces the run's own tasks in the workload of an LLM
    run (their instruction formats: system prompts, label words); a vision
    workload is always built from the run's tasks (its heads and classes).
    Collective: every rank builds the same model.
    """

    def __init__(
        self,
        run: str | Path,
        checkpoint: str | Path | None = None,
        overrides: list[str] | None = None,
        workload_sequence: TaskSequenceConfig | None = None,
    ) -> None:
        self.run = Path(run)
        self.cfg: RunConfig = recorded_config(self.run, None, overrides or [])[0]
        self.device = init_distributed(self.cfg.deepspeed.collective_timeout_s)
        if checkpoint is None:
            self.checkpoint = task_boundary_checkpoint(self.run)
        else:
            self.checkpoint = Path(checkpoint)
            Checkpointer.verify_once_per_node(self.checkpoint)  # collective
        tensors, self.meta = read_state(self.checkpoint)
        if self.meta["progress"]["phase"] != "start":
            raise ValueError(f"{self.checkpoint} was written mid-task: use a task-boundary checkpoint (*-done)")
        position = (self.meta["progress"]["task"], self.meta["progress"]["step"])
        self.cfg, changes = recorded_config(self.run, position, overrides or [])
        if changes:
            logger.info("%s: config changes made before %s applied: %s", self.run, self.checkpoint.name,
                        describe(changes))  # fmt: skip
        self.records: list[dict[str, Any]] = self.meta["task_sequence"]
        self.sequence = _run_sequence(self.records, self.cfg.model.kind)
        language = self.cfg.model.kind in LANGUAGE_MODEL_KINDS
        seq = workload_sequence if workload_sequence is not None and language else None
        self.workload: Workload
        self.workload, self.method = assemble(self.cfg, seq or self.sequence, self.device, len(self.records))
        finished = self.meta["progress"]["task"]  # stages finished
        #: the tasks the model has learned, in order (all of them when the method trains them in one stage)
        self.learned = [self.records[t]["name"] for tasks in self.method.stages(len(self.records))[:finished]
                        for t in tasks]  # fmt: skip
        restore(self.workload, self.method, tensors, self.meta, self.checkpoint)
        self.report = self.method.report
        self.engine = build_inference_engine(self.workload.model, self.cfg)  # collective
        logger.info("%s: %d learned tasks (%s) from %s", self.run, len(self.learned), ", ".join(self.learned),
                    self.checkpoint.name)  # fmt: skip

    @property
    def upto(self) -> int:
        """The index of the last learned task: scores use heads 0..upto."""
        return len(self.learned) - 1
