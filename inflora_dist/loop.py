"""The continual task loop: it orchestrates, the components do the work.

For each stage of the sequence (one task, or all of them for a joint method):

    every rank fingerprints config, task data, versions and frozen weights -> stop on any mismatch
    method.prepare_stage: branches that need no data   (a trained A's initial value: O-LoRA)
    build the stage's engine (trainable: the method's branch tensors, and the stage's heads)
    method.start_stage: install the branches     (InfLoRA: a covariance pass over the data -> A_t)
    train for `train.epochs` epochs, the method's loss terms added   (step checkpoints, pre-emption)
    method.finish_stage: fold the branches       (InfLoRA: a covariance pass -> DualGPM, fold B_t A_t)
      the same data pass sums each class's features      -> class statistics (classification)
    method.update_heads from the statistics      (classifier alignment with ca.enabled; prototypes)
    evaluate tasks 0..t, record the scores       -> metrics.json, plots, W&B
    checkpoint; destroy the engine

A pre-emption signal is honoured at the next step boundary while training, and
at the next task boundary (after its checkpoint) during the work after training.

How tasks are learned comes from the method (methods/: InfLoRA, joint,
seq-LoRA, SimpleCIL); what is trained and scored (images and heads, or a
language model and its generated answers) from a workload (workloads.py). The
trainer never asks which method or model it runs. One process group serves the
whole sequence. Every rank runs the same collectives in the same order; only
rank 0 logs, draws progress bars and writes files other than checkpoint shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from inflora_dist import __version__, dist
from inflora_dist.agreement import check_ranks_agree, frozen_weights, tensors_digest
from inflora_dist.checkpoint import STATS_PREFIX, CheckpointCorrupt, Checkpointer, check_resumable
from inflora_dist.config import RunConfig, WandbConfig, to_dict
from inflora_dist.covariance import CovarianceCollector, TokenBudget, restrict_mask
from inflora_dist.data import ShardError, TaskLoader, TaskSequenceConfig, load_task_sequence, open_task
from inflora_dist.data.build_shards import build_from_config
from inflora_dist.data.spec import check_classes, task_records
from inflora_dist.data.transforms import configured_transform
from inflora_dist.engine import batch_layout, build_engine, destroy_engine, init_distributed
from inflora_dist.errors import INTERRUPTED_EXIT_CODE, UserError, WriteError
from inflora_dist.export import check_export_targets, export_class_statistics, export_peft_adapter, written_atomically
from inflora_dist.inject import count_parameters
from inflora_dist.methods import Stage, assemble, restore
from inflora_dist.metrics import pooled_metrics, save_metrics
from inflora_dist.monitor import Monitor, device_peak_mb_per_rank, memory_mb_per_rank
from inflora_dist.run_record import describe, record_resume, record_start
from inflora_dist.runlock import RunDirectoryLocked, RunLock
from inflora_dist.workloads import score_task
from inflora_dist.writes import write_json

logger = logging.getLogger(__name__)

#: Exit status after a pre-emption signal (SIGTERM, SIGUSR1) was handled: checkpoint written, requeue me.
PREEMPTED_EXIT_CODE = 75
#: What a finished run's exports record: the checkpoint they were written from (a rerun then writes nothing).
EXPORTS_NAME = "exports.json"


@dataclass
class Progress:
    """Where the run stands: saved in every checkpoint."""

    task: int = 0  # the task being trained, or the next one
    phase: str = "start"  # start: nothing of `task` done yet; train: A_t designed, training under way
    step: int = 0  # optimizer steps done in `task`
    global_step: int = 0
    loader: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "consumed": 0})


class NonFiniteLoss(UserError, RuntimeError):
    """A training step's loss was NaN or infinite on some rank: every rank stops before its update."""


class ContinualTrainer:
    """Runs a task sequence with a continual-learning method under DeepSpeed; see the module docstring for the
    order of work."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.device = init_distributed(cfg.deepspeed.collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(cfg.seed + self.rank)
        self.out = Path(cfg.output_dir)
        self.lock = RunLock(self.out, cfg.checkpoint.lock_stale_after_s)
        self._take_run_directory()  # collective: before anything is written
        try:
            self._prepare()
        except BaseException:
            if dist.is_main_process():  # a refused start leaves the directory free
                self.lock.release()
            raise

    def _prepare(self) -> None:
        """Everything before the first stage: the task sequence, the model and method, the resume, the records."""
        cfg = self.cfg
        self.seq = self._task_sequence()
        self.index = self.seq.load_index()
        unchecked = check_classes(self.seq, self.index)  # before anything trains: labels beyond a task's classes
        if unchecked and dist.is_main_process():
            logger.warning("%d shards' index entries record no classes (an older index): their labels are not "
                           "checked against the tasks' classes", len(unchecked))  # fmt: skip
        #: the image recipes of the loaders by view (data.train_transform, data.eval_transform; None: as stored)
        self.transforms = {
            "train": configured_transform(cfg.data.train_transform, cfg.model.image_size),
            "eval": configured_transform(cfg.data.eval_transform, cfg.model.image_size),
        }
        self.names = [t.name for t in self.seq.tasks]
        self.num_tasks = len(self.seq.tasks)
        self.task_metrics = [t.instruction.metric if t.instruction else "accuracy" for t in self.seq.tasks]
        # The same model, heads and branches on every rank; the method says which tasks train together.
        self.workload, self.method = assemble(cfg, self.seq, self.device, self.num_tasks)
        self.model = self.workload.model
        self.stages = self.method.stages(self.num_tasks)
        report = self.method.report
        # The pre-trained weights the branches adapt, as loaded (before any merge): compared before every stage.
        start = time.perf_counter()
        self.weights_digest = tensors_digest(frozen_weights(report))  # collective under ZeRO-3
        logger.info("frozen weights of the targeted layers hashed in %.1f s", time.perf_counter() - start)
        self.micro, self.accumulation = batch_layout(
            cfg.train.global_batch_size, self.world, cfg.train.max_micro_batch_size
        )
        self.scores = self.method.new_scores(self.workload.matrices, self.num_tasks)
        # Every task scored once before task 0 (what training adds); None per task an extension added later.
        self.zero_shot: list[float | None] | None = None
        self.timings: list[dict[str, float]] = []  # per stage: seconds of training, class statistics, alignment
        self.progress = Progress()
        self.checkpointer = Checkpointer(self.out / "checkpoints", keep=cfg.checkpoint.keep)
        self._resume_path: Path | None = None
        self._resume_config: dict[str, Any] | None = None
        run_id = self._resume()
        #: a finished run whose exports were written from its last checkpoint: a rerun writes nothing
        self.done = not dist.any_rank(not self._exported())  # collective: every rank runs the same collectives
        if not self.done:
            self._check_export_targets()  # collective: before anything is written
            self._write_on_main(self._record_config)  # collective; after the resume checks: a refused config
        self.monitor = Monitor(cfg.wandb if not self.done else WandbConfig(enabled=False), self.out, asdict(cfg),
                               run_id)  # fmt: skip
        self._stop, self._interrupted = False, False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._request_stop)
        logger.info(
            "%s: %d tasks in %d stages, %d input groups, micro batch %d x %d ranks x %d accumulation, ZeRO %d",
            cfg.method, self.num_tasks, len(self.stages), len(report.groups), self.micro, self.world,
            self.accumulation, cfg.deepspeed.zero_stage,
        )  # fmt: skip

    # ------------------------------------------------------------------ setup
    def _take_run_directory(self) -> None:
        """Rank 0 takes the output directory's lock; every rank learns the verdict (one all-reduce)."""
        failure = ""
        if dist.is_main_process():
            try:
                self.lock.acquire()
            except RunDirectoryLocked as err:
                failure = str(err)
        if dist.any_rank(bool(failure)):  # collective
            raise RunDirectoryLocked(failure or f"run directory {self.out} is in use by another run (see rank 0)")

    def _exported(self) -> bool:
        """Whether every stage is done and the exports were written from the checkpoint resumed."""
        if self._resume_path is None or self.progress.task < len(self.stages):
            return False
        try:
            recorded = json.loads((self.out / EXPORTS_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(recorded, dict) and recorded.get("checkpoint") == self._resume_path.name

    def _check_export_targets(self) -> None:
        """Refuse, before anything is written, export folders that hold what is not an earlier export of this
        run (export.check_export_targets). Collective (one all-reduce)."""
        names = ["peft_adapter"] * (self.method.trains and self.method.adapter_export)
        names += ["model"] * self.cfg.export.merged_model + list(self.method.exports)
        check_export_targets([self.out / name for name in names])  # collective

    def _write_on_main(self, write: Callable[[], object]) -> None:
        """Run `write` on the main process only; a file it could not write (WriteError: a full disk) stops every
        rank with that error. Collective (one all-reduce)."""
        failure = ""
        if dist.is_main_process():
            try:
                write()
            except WriteError as err:
                failure = str(err)
        dist.raise_agreed(failure, WriteError)  # collective

    def _record_config(self) -> None:
        """config.yaml when the run starts afresh; on a resume, the keys changed since the checkpoint were written
        (run_record). Main process only."""
        if self._resume_path is None:
            record_start(self.out, self.cfg)
            return
        if self._resume_config is None:  # a checkpoint older than config records: nothing to compare with
            return
        position = (self.progress.task, self.progress.step)
        changes = record_resume(self.out, self._resume_config, self.cfg, to_dict(self.cfg), position)
        if changes:
            logger.info("config changed on resume (recorded in config_changes.json): %s", describe(changes))

    def _task_sequence(self) -> TaskSequenceConfig:
        cfg = self.cfg.data
        build = cfg.build
        if build and dist.is_main_process() and not Path(cfg.tasks).exists():
            build_from_config(build, Path(cfg.tasks).parent)
        dist.barrier()  # collective: the shards exist before anyone reads them
        options = cfg.storage_options or None
        return load_task_sequence(cfg.tasks, storage_options=options)

    def _request_stop(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self._interrupted:  # a second Ctrl-C: leave now, without the checkpoint
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self._interrupted = True
            logger.warning("Ctrl-C: stopping at the next step boundary with a checkpoint (again: stop at once)")
        else:
            logger.warning("signal %d: stopping at the next step boundary", signum)
        self._stop = True

    def _stopped_exit_code(self) -> int:
        """The exit status of a run stopped by a signal: 130 after Ctrl-C on this rank, else 75 (requeue)."""
        return INTERRUPTED_EXIT_CODE if self._interrupted else PREEMPTED_EXIT_CODE

    def _stop_agreed(self) -> bool:
        """Whether any rank got a pre-emption signal. Collective (one all-reduce)."""
        return dist.any_rank(self._stop)

    def _loader(self, task: int | list[int], split: str, mode: str, batch: int, accumulation: int = 1,
                interleave: bool = False, view: str | None = None) -> TaskLoader:  # fmt: skip
        """A loader of `split`, its images transformed as `view` ("train" or "eval"; default: the split's)."""
        # Training on several tasks at once (joint) interleaves their shards, so every batch mixes the tasks.
        mix = interleave or (mode == "train" and isinstance(task, list) and len(task) > 1)
        stream = open_task(
            self.seq, task, split, batch_size=batch, mode=mode, seed=self.cfg.seed, index=self.index,
            accumulation=accumulation, interleave=mix, transform=self.transforms[view or split],
            channels=self.cfg.model.channels,
        )  # fmt: skip
        return TaskLoader(stream, num_workers=self.cfg.train.num_workers)

    def _agreed(self, batches: Iterable[Any], what: str) -> Iterator[Any]:
        """`batches` while every rank reads its own. A shard that cannot be read, or whose bytes differ from the
        index, on any rank stops every rank with ShardError naming it (and `what` read it), before the batch is
        used: nothing from it reaches a step, and no checkpoint is written. Collective: one all-reduce per batch
        (every rank reads the same number of batches)."""
        it = iter(batches)
        while True:
            failure = ""
            try:
                batch = next(it)
            except StopIteration:
                return
            except ShardError as err:
                failure = f"{what}: {err.reason}"
            dist.raise_agreed(failure, ShardError)  # collective
            yield batch

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not dist.is_main_process(), leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------ state
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Adapters, heads and memories as tensors; progress and metrics as JSON. Collective under ZeRO-3."""
        params = {n: p for n, p in self.model.named_parameters() if ".lora_" in n or n.startswith("heads.")}
        with dist.gathered_params(params.values()):  # collective under ZeRO-3
            tensors = {n: p.detach().cpu().clone() for n, p in params.items()}
        tensors.update({n: b.cpu() for n, b in self.model.named_buffers() if n.endswith(("lora_A", "task_status"))})
        method_tensors, method_meta = self.method.state()
        tensors.update(method_tensors)
        classes = self.workload.classes
        if classes is not None:
            tensors.update({f"{STATS_PREFIX}{k}": v for k, v in classes.statistics.state_dict().items()})
        meta = {
            "progress": asdict(self.progress),
            **self.scores.state(),
            "zero_shot": self.zero_shot,
            "timings": self.timings,
            "config": to_dict(self.cfg),
            "task_sequence": task_records(self.seq, self.index),
            **method_meta,
            "wandb_run_id": self.monitor.run_id,
            "world_size": self.world,
        }
        return tensors, meta

    def _save(self, label: str, engine: Any = None) -> None:
        tensors, meta = self._state()
        path = self.checkpointer.save(label, tensors, meta, engine)  # collective
        logger.info("checkpoint %s", path)

    def _resume(self) -> str | None:
        """Restore the newest checkpoint (resume=auto) or the one named; returns the W&B run id."""
        if self.cfg.resume == "never":
            return None
        loaded = self._load_checkpoint()
        if loaded is None:
            return None
        path, tensors, meta = loaded
        check_resumable(
            path, meta, to_dict(self.cfg), self.cfg.data.tasks, task_records(self.seq, self.index),
            self.method.stages, self.method.resume_problems, self.world,
        )  # fmt: skip
        saved_tasks = len(meta.get("task_sequence", self.seq.tasks))
        restore(self.workload, self.method, tensors, meta, path)
        self.scores.load_state(meta)
        self.zero_shot = meta.get("zero_shot")
        self.timings = meta["timings"]
        self.progress = Progress(**meta["progress"])
        self._resume_path, self._resume_config = path, meta.get("config")
        logger.info("resumed from %s: task %d, phase %s", path, self.progress.task, self.progress.phase)
        if saved_tasks < self.num_tasks:
            logger.info(
                "extending the run's %d tasks by %d: %s %s", saved_tasks, self.num_tasks - saved_tasks,
                ", ".join(self.names[saved_tasks:]), self.method.describe(),
            )  # fmt: skip
        return meta["wandb_run_id"]

    def _load_checkpoint(self) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The checkpoint to resume from, verified: the one named (a failure is final), or with resume=auto
        the newest of this run's that verifies, skipping (and naming) corrupt ones. Collective."""
        if self.cfg.resume != "auto":
            path = Path(self.cfg.resume)
            return (path, *Checkpointer.load(path))
        candidates = self.checkpointer.complete()[::-1]
        for path in candidates:
            try:
                return (path, *Checkpointer.load(path))  # collective: the verdict is the same on every rank
            except CheckpointCorrupt as err:
                logger.warning("resume=auto: skipping a corrupt checkpoint: %s", err)
        if candidates:
            raise CheckpointCorrupt(
                f"resume=auto: none of the {len(candidates)} checkpoints in {self.checkpointer.root} verifies "
                "(see the warnings); resume=never starts the run afresh"
            )
        return None

    def _agreement_items(self, stage: int) -> dict[str, Any]:
        """What must be equal on every rank before `stage`: the same names and order on every rank.

        The task specs and shard index entries are compared by content, not by
        location (the sequence's root may differ between nodes' copies).
        """
        import deepspeed
        import transformers

        tasks = [self.seq.tasks[t] for t in self.stages[stage]]
        shards = {
            self.names[t]: {
                "index": self.index.get("tasks", {}).get(self.names[t]),
                "shards": {
                    path: self.index.get("shards", {}).get(path)
                    for split in ("train", "eval")
                    for path in self.seq.shard_paths(t, split)
                },
            }
            for t in self.stages[stage]
        }
        return {
            "resolved config": to_dict(self.cfg),
            "task spec": [asdict(t) for t in tasks],
            "shard index entries": shards,
            "class order": self.seq.class_ids or self.names,
            "torch version": torch.__version__,
            "deepspeed version": deepspeed.__version__,
            "transformers version": transformers.__version__,
            "inflora_dist version": __version__,
            "frozen weights of the targeted layers": self.weights_digest,
        }

    # ------------------------------------------------------------------ passes
    def _data_pass(
        self,
        engine: Any,
        tasks: list[int],
        desc: str,
        collector: CovarianceCollector | None,
        sums: Any,
        max_tokens: int | None,
    ) -> float:
        """One no-grad pass over the tasks' training data (exact mode) feeding `collector` and/or the class
        `sums`; returns the seconds spent summing class features.

        The collector sees the images as training does (data.train_transform: the reference designs A and grows
        its memory from its training loader) and the class statistics as evaluation does (data.eval_transform,
        the reference's class means); when the two transforms differ, a pass feeding both is two passes.
        With `max_tokens` the collector sees only the first samples that fit the budget (TokenBudget), read
        with the shards interleaved so that they come from every shard; the pass then ends there, unless it
        also sums the class statistics, which read every sample. Collective."""
        if collector is not None and sums is not None and self.transforms["train"] != self.transforms["eval"]:
            self._data_pass(engine, tasks, desc, collector, None, max_tokens)
            return self._data_pass(engine, tasks, f"{desc} (class statistics)", None, sums, None)
        view = "train" if collector is not None else "eval"
        budget = TokenBudget(max_tokens) if max_tokens else None
        loader = self._loader(tasks, "train", "exact", self.cfg.train.eval_batch_size, interleave=budget is not None,
                              view=view)  # fmt: skip
        summing = 0.0
        with torch.no_grad(), self._bar(len(loader), desc) as bar:
            for raw in self._agreed(loader, desc):
                if budget is not None and budget.full and sums is None:
                    break  # the same batch on every rank: `full` comes from the same gathered counts
                batch = self.workload.prepare(raw)
                mask = self.workload.token_mask(batch)
                if budget is not None:
                    mask = restrict_mask(mask, budget.take(self.workload.row_tokens(batch)))  # collective
                with collector.token_mask(mask) if collector else contextlib.nullcontext():
                    features = self.workload.forward(engine, batch, upto=tasks[-1])
                if sums is not None:
                    start = time.perf_counter()
                    self.workload.classes.add_features(sums, features, batch)
                    summing += time.perf_counter() - start
                bar.update(1)
        if budget is not None and dist.is_main_process():
            logger.info("%s: %d tokens of %d samples (inflora.covariance_max_tokens=%d)", desc, budget.used,
                        budget.samples, max_tokens)  # fmt: skip
        return summing

    def _stage(self, engine: Any, stage: int) -> Stage:
        """What the method's hooks get for `stage`: its tasks, its engine and passes over its training data."""
        tasks = self.stages[stage]
        return Stage(stage, tasks, engine, partial(self._data_pass, engine, tasks), self.phase_seconds)

    def _evaluate(self, engine: Any, upto: int, tasks: range | None = None) -> list[list[float]]:
        """One row per accuracy matrix: the scores (%) of `tasks` (default 0..upto) with tasks 0..upto learned.
        Collective (one all-reduce per task)."""
        engine.eval()
        rows: list[list[float]] = [[] for _ in self.workload.matrices]
        for j in range(upto + 1) if tasks is None else tasks:
            loader = self._loader(j, "eval", "exact", self.cfg.train.eval_batch_size)
            with self._bar(len(loader), f"evaluate {self.names[j]}") as bar, self.method.evaluating(j, upto):
                batches = self._agreed(loader, f"task {self.names[j]} eval")
                scores = score_task(self.workload, engine, batches, j, upto, bar)  # collective
            for row, value in zip(rows, scores, strict=True):
                row.append(value)
        return rows

    # ------------------------------------------------------------------ training
    def _set_trainable(self, stage: int) -> list[dict[str, Any]]:
        """Only the method's branch tensors and the stage's heads (if any) train; returns their optimizer groups."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        branches = self.method.trainable_parameters(stage)
        head = [p for t in self.stages[stage] for p in self.workload.task_parameters(t)]
        for p in branches + head:
            p.requires_grad_(True)
        head_lr = self.cfg.train.head_lr or self.cfg.train.lr
        return [{"params": branches}] + ([{"params": head, "lr": head_lr}] if head else [])

    def _fit(self, engine: Any, task: int, loader: TaskLoader) -> bool:
        """Train stage `task` to the end of its epochs; False if stopped by a pre-emption signal.

        One collective per optimizer step, between the step's last backward and its
        update (`_step_sums`): the next step's units, this step's loss and its count
        of non-finite micro-batch losses, the pre-emption flags and whether a rank
        could not read the next step's data. A non-finite loss on any rank so stops
        every rank before the update (NonFiniteLoss); a shard that cannot be read or
        does not match its index stops them before the update too (ShardError).
        """
        cfg, a = self.cfg, self.accumulation
        tasks = self.stages[task]
        total = cfg.train.epochs * (len(loader) // a)
        bar = self._bar(total, f"task {task} train")
        bar.update(self.progress.step)
        tick, samples = time.perf_counter(), 0.0
        last_finite: tuple[int, float] | None = None
        steps = self._train_steps(loader)
        current, unread = self._next_step(steps)
        units, *_ = self._step_sums(current, 0.0, 0, unread)  # collective: the first step's units
        engine.train()
        try:
            while current is not None:
                batches, position = current
                # The loss is a mean over the step's units (real rows, or response tokens) on every rank, whatever
                # the ranks and accumulation: DeepSpeed divides by `a` and averages over ranks, so each micro-batch's
                # summed loss is scaled by a * world / (the step's units, all ranks).
                scale = a * self.world / max(units, 1.0)
                local_loss, bad = 0.0, 0
                for i, batch in enumerate(batches):
                    loss = self.workload.loss(engine, batch, tasks)
                    value = float(loss.detach())
                    bad += not math.isfinite(value)
                    local_loss += value if math.isfinite(value) else 0.0
                    # The method's terms (regularisers) count once per step: DeepSpeed divides by `a` and averages
                    # the ranks, as for the loss of the reference implementations.
                    terms = self.method.loss_terms()
                    engine.backward(loss * scale if terms is None else loss * scale + terms)
                    if i < len(batches) - 1:
                        engine.step()  # accumulation micro-step: no update yet
                current, unread = self._next_step(steps)
                next_units, loss_sum, bad_total, stop = self._step_sums(current, local_loss, bad, unread)  # collective
                step_loss = loss_sum / max(units, 1.0)
                if bad_total:
                    raise NonFiniteLoss(self._non_finite_message(task, total, int(bad_total), last_finite))
                engine.step()  # the update
                self.method.after_update(engine.get_lr()[0])  # collective: what trains outside the engine
                last_finite = (self.progress.step + 1, step_loss)
                samples += sum(float(b["weight"].sum()) for b in batches)
                self.progress.step += 1
                self.progress.global_step += 1
                self.progress.loader = position
                bar.update(1)
                if self.progress.step % cfg.train.log_every == 0:
                    elapsed = time.perf_counter() - tick
                    values = {
                        "train/loss": step_loss,  # the step's mean over all ranks' units
                        "train/lr": engine.get_lr()[0],
                        "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                        "train/samples_per_s": samples * self.world / max(elapsed, 1e-9),
                        "task": task,
                    }
                    bar.set_postfix(loss=f"{step_loss:.3f}")
                    self.monitor.log(values, self.progress.global_step)
                    tick, samples = time.perf_counter(), 0.0
                every = cfg.checkpoint.every_steps
                if every and self.progress.step % every == 0:
                    self._save(f"task{task}-step{self.progress.step}", engine)
                if stop:
                    self._save(f"task{task}-step{self.progress.step}-preempted", engine)
                    return False
                units = next_units
        finally:
            bar.close()  # before any error line: the bar's text would prefix it
        return True

    def _train_steps(self, loader: TaskLoader) -> Iterator[tuple[list[dict[str, torch.Tensor]], dict[str, int]]]:
        """The remaining optimizer steps of the task: (prepared micro-batches, loader position after them)."""
        while loader.epoch < self.cfg.train.epochs:
            step: list[dict[str, torch.Tensor]] = []
            for batch in loader:
                step.append(self.workload.prepare(batch))
                if len(step) == self.accumulation:  # the plan pads whole steps
                    yield step, loader.state_dict()
                    step = []

    def _next_step(self, steps: Iterator[Any]) -> tuple[Any, str]:
        """(the next step's micro-batches, or None at the end; why this rank could not read them, or "")."""
        try:
            return next(steps, None), ""
        except ShardError as err:
            return None, f"stage {self.progress.task} training: {err.reason}"

    def _step_sums(self, upcoming: Any, loss: float, bad: int, unread: str) -> tuple[float, float, float, bool]:
        """(units of the upcoming step, this step's summed loss, non-finite losses, stop requested), summed over
        the ranks in one all-reduce; raises ShardError on every rank if any rank could not read the upcoming
        step (`unread`). Collective."""
        units = float(sum(self.workload.units(b) for b in upcoming[0])) if upcoming is not None else 0.0
        sums = torch.tensor([units, loss, float(bad), float(self._stop), float(bool(unread))], dtype=torch.float64)
        sums = dist.all_reduce_sum_(sums.to(dist.collective_device())).tolist()
        if sums[4]:
            raise ShardError(dist.gathered_failures(unread))  # collective: before this step's update
        return sums[0], sums[1], sums[2], sums[3] > 0

    def _non_finite_message(self, task: int, total: int, bad: int, last_finite: tuple[int, float] | None) -> str:
        t = self.cfg.train
        last = f"the last finite step loss was {last_finite[1]:.6g} (step {last_finite[0]})" if last_finite else (
            "no step of this task had a finite loss yet"
        )  # fmt: skip
        return (
            f"task {task} ({self.names[self.stages[task][0]]}), step {self.progress.step + 1} of {total}: the loss "
            f"is not finite ({bad} micro-batch(es) over all ranks); {last}. Every rank stopped before the update; "
            f"no checkpoint of this step was written. Likely causes: a learning rate too high (train.lr={t.lr:g}, "
            f"train.head_lr={t.head_lr}), or the precision (train.precision={t.precision}, model.dtype="
            f"{self.cfg.model.dtype}): lower the lr, set train.grad_clip, or train in fp32."
        )

    def _after_training(self, stage: Stage) -> dict[str, float]:
        """Fold the branches (the method) and, for classification, update the class statistics and set the heads
        from them. Returns {class_statistics_s, alignment_s}. Collective."""
        classes = self.workload.classes
        sums = classes.class_sums(stage.tasks) if classes is not None else None
        timing = {"class_statistics_s": self.method.finish_stage(stage, sums), "alignment_s": 0.0}
        if classes is None:
            return timing
        start = time.perf_counter()
        classes.finish_class_sums(sums)  # collective
        timing["class_statistics_s"] += time.perf_counter() - start
        start = time.perf_counter()
        losses = self.method.update_heads(classes, stage.index, stage.tasks)  # collective
        if losses:
            logger.info("alignment losses per epoch: %s", ", ".join(f"{x:.4f}" for x in losses))
            self.monitor.log({"ca/loss": losses[-1]}, self.progress.global_step)
        timing["alignment_s"] = time.perf_counter() - start
        return timing

    def _run_task(self, stage: int) -> bool:
        cfg = self.cfg
        tasks = self.stages[stage]
        resuming = self.progress.phase == "train" and self.progress.task == stage
        names = ", ".join(self.names[t] for t in tasks)
        check_ranks_agree(self._agreement_items(stage), f"before stage {stage} ({names})")  # collective
        # Seconds of the stage's passes (with their reductions) and of the subspace math, for the timings.
        self.phase_seconds: dict[str, float] = {}
        if not resuming:
            self.method.prepare_stage(stage)  # before the engine: its optimizer copies what trains from here
        groups = self._set_trainable(stage)
        loader = self._loader(tasks, "train", "train", self.micro, self.accumulation)
        total_steps = cfg.train.epochs * len(loader) // self.accumulation
        engine = build_engine(self.model, groups, cfg, self.micro, self.accumulation, total_steps)
        try:
            if resuming:
                engine.load_checkpoint(str(self._resume_path / "engine"), tag="engine")
                loader.load_state_dict(self.progress.loader)
            else:
                if stage == 0 and self.workload.zero_shot and cfg.train.zero_shot_eval:
                    logger.info("zero-shot: every task scored before any training")
                    self.zero_shot = self._evaluate(engine, -1, range(self.num_tasks))[0]  # collective
                logger.info("stage %d (%s): the branches", stage, ", ".join(self.names[t] for t in tasks))
                self.method.start_stage(self._stage(engine, stage))  # collective
                self.progress = Progress(task=stage, phase="train", global_step=self.progress.global_step)
                seconds = self.phase_seconds.get("design_pass_s", 0.0)
                self.monitor.log({"time/covariance_pass_s": seconds}, self.progress.global_step)
            trainable, total = count_parameters(self.model)
            logger.info("stage %d: training %d of %d parameters", stage, trainable, total)
            start = time.perf_counter()
            if self.method.trains and not self._fit(engine, stage, loader):
                return False
            train_seconds = time.perf_counter() - start
            training_memory = memory_mb_per_rank()  # collective: the engine's partitioned state is resident now
            logger.info("stage %d: folding the branch", stage)
            timing = self._after_training(self._stage(engine, stage))
            rows = self._evaluate(engine, tasks[-1])
            self.timings.append(
                {"train_s": train_seconds, **self.phase_seconds, **timing, "rss_mb_per_rank": training_memory[0],
                 "peak_rss_mb_per_rank": memory_mb_per_rank()[1]}  # collective; the peak so far, evaluation included
            )  # fmt: skip
            device_peak = device_peak_mb_per_rank(self.device)  # collective on GPUs; None (no entry) on the host
            if device_peak is not None:
                self.timings[-1]["peak_device_mb_per_rank"] = device_peak
            self.scores.add(rows)
            self.progress = Progress(task=stage + 1, phase="start", global_step=self.progress.global_step)
            self._report()
            self._save(f"task{stage}-done")
        finally:
            destroy_engine(engine)
        return True

    def _report(self) -> None:
        """metrics.json, the printed scores, plots and W&B after a stage (rank 0); a file that cannot be written
        stops every rank with WriteError. Collective (one all-reduce)."""
        self._write_on_main(self._write_report)  # collective

    def _write_report(self) -> None:
        values: dict[str, Any] = {"time/post_covariance_pass_s": self.timings[-1].get("update_pass_s", 0.0)}
        values.update({f"time/{k}": v for k, v in self.timings[-1].items()})
        values.update(self.method.log_values())
        extra: dict[str, Any] = {"method": self.cfg.method, "task_names": self.names, "task_metrics": self.task_metrics}
        if self.zero_shot is not None:
            extra["zero_shot"] = self._zero_shot_row()
        extra.update(ca=self.cfg.ca.enabled, timings=self.timings, **self.method.metrics())
        # The paper's accuracy: every eval sample of the tasks so far pooled (a joint run's one row: all tasks),
        # each task weighted by its eval samples: the spec's count, which open_task checks equals the index's
        # count of the shards evaluated (the index's per-task entry is by name, stale if tasks.yaml was edited).
        pooled = pooled_metrics(self.scores.primary_rows(), [t.eval.samples for t in self.seq.tasks])
        extra.update(pooled)
        save_metrics(self.out / "metrics.json", self.scores, extra)
        print(self.scores.text(self.names, extra.get("zero_shot")), flush=True)
        curve = ", ".join(f"{v:.2f}" for v in pooled["pooled_acc"])
        print(f"pooled accuracy (all eval samples of the tasks so far, the paper's): final "
              f"{pooled['pooled_final']:.2f}, average {pooled['pooled_avg']:.2f} (after each task: {curve})",
              flush=True)  # fmt: skip
        values.update({"cl/pooled_acc": pooled["pooled_final"], "cl/pooled_avg": pooled["pooled_avg"]})
        values.update(self.scores.log_values())
        self.monitor.log(values, self.progress.global_step)
        images = self.scores.plot(self.out, self.names)
        if images:
            self.monitor.log_matrix(self.scores.primary_rows(), self.names, images[0], self.progress.global_step)

    def _zero_shot_row(self) -> list[float | None] | None:
        """The zero-shot scores, one per task of the sequence (None for tasks an extension added)."""
        if self.zero_shot is None:
            return None
        return [*self.zero_shot, *[None] * (self.num_tasks - len(self.zero_shot))]

    # ------------------------------------------------------------------ entry
    def run(self) -> int:
        """Train the remaining tasks; returns the process exit status (0, PREEMPTED_EXIT_CODE, or
        INTERRUPTED_EXIT_CODE after Ctrl-C). A finished, exported run writes nothing."""
        try:
            if self.done:
                logger.info("%s is finished and exported (%s): nothing to train or write; export_model writes "
                            "other exports of it", self.out, EXPORTS_NAME)  # fmt: skip
                return 0
            for stage in range(self.progress.task, len(self.stages)):
                if self._stop_agreed():  # collective: a signal during the last task's post-training work
                    logger.warning("pre-empted before stage %d: its last checkpoint is complete, exiting", stage)
                    return self._stopped_exit_code()
                if not self._run_task(stage):
                    logger.warning("pre-empted during stage %d: checkpoint written, exiting", stage)
                    return self._stopped_exit_code()
            self._export()
            return 0
        finally:
            self.monitor.finish()
            if dist.is_main_process():
                self.lock.release()

    def _export(self) -> None:
        """continual_state and class_statistics (.safetensors + .json), the PEFT adapter, with
        export.merged_model a plain transformers model (model/), the method's own folders (GainLoRA's
        gated_model/), then exports.json naming the checkpoint they came from. A file that cannot be written
        stops every rank with WriteError.

        Collective under ZeRO-3 (B, and for the merged model every parameter, is gathered).
        """
        classes = self.workload.classes
        stage_names = ["+".join(self.names[t] for t in tasks) for tasks in self.stages]

        def write_files() -> None:
            self.method.export(self.out, stage_names)
            if classes is not None:
                export_class_statistics(
                    classes.statistics, self.out / "class_statistics.safetensors", classes.class_ids,
                    classes.offsets, self.names,
                )  # fmt: skip

        self._write_on_main(write_files)  # collective
        if self.method.trains and self.method.adapter_export:  # no branch, or gated ones: no adapter
            with written_atomically(self.out / "peft_adapter") as folder:  # collective
                export_peft_adapter(
                    self.model, self.method.report, folder, self.cfg.model.pretrained,
                    task_type=self.workload.peft_task_type,
                )  # fmt: skip
        if self.cfg.export.merged_model:
            with written_atomically(self.out / "model") as folder:  # collective
                self.workload.export_model(self.method.report, folder, self.cfg.export.max_shard_size)
        for name in self.method.exports:
            with written_atomically(self.out / name) as folder:  # collective
                self.method.write_export(name, folder, stage_names)
        # The record that the exports are complete, naming the checkpoint they came from (`_exported`).
        last = self.checkpointer.complete
        self._write_on_main(lambda: write_json(self.out / EXPORTS_NAME, {"checkpoint": last()[-1].name}))  # collective
