"""Checkpoints: the DeepSpeed engine (mid-task only) plus our continual state, written atomically.

Layout of `<output_dir>/checkpoints/<NNNNNN-taskT-label>/`:

    state.safetensors   adapters (A, B, task status), heads, subspace bases
    state.json          task index, phase, step counters, data position, metrics, W&B id, memory modes
    rng.<rank>.json     each rank's RNG states (torch state as a list of bytes)
    engine/             DeepSpeed's own files (optimizer and schedule; mid-task checkpoints only)
    manifest.json       sha256 of every file above; written last

A checkpoint is written to a hidden temp directory and renamed into place
when complete, so a crash never leaves a half checkpoint that looks whole;
only the newest `keep` are kept. Loading verifies the manifest first. Our own
files hold tensors and JSON only (nothing is unpickled); DeepSpeed unpickles
its engine files itself, so a checkpoint directory must be trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from inflora_dist import dist
from inflora_dist.config import resume_differences
from inflora_dist.data.spec import continuation_error
from inflora_dist.errors import UserError, WriteError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MEMORY_PREFIX = "memory."  # state.safetensors: subspace bases by input group
STATS_PREFIX = "class_stats."  # state.safetensors: the class statistics' tensors
METHOD_PREFIX = "method."  # state.safetensors: a method's own tensors beside the model's (GainLoRA's gates)


class CheckpointCorrupt(UserError, RuntimeError):
    """A checkpoint's files do not match its manifest (or the manifest is unreadable)."""


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (a full disk, a quota); the ones before it are untouched."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """This process's Python and torch RNG states, JSON-serialisable."""
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by `rng_state`."""
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class Checkpointer:
    """Writes and finds checkpoints under `root`, keeping the newest `keep`."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root, self.keep = Path(root), keep

    def complete(self) -> list[Path]:
        """Finished checkpoints (with a manifest), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).exists())

    def save(self, label: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], engine: Any = None) -> Path:
        """Write one checkpoint. Collective: every rank calls it (each writes its RNG state and engine shard).

        A failed write on any rank (a full disk, a quota) raises CheckpointWriteError on every rank and
        removes the partial checkpoint; the complete ones before it are untouched.
        """
        done = self.complete()
        number = int(done[-1].name.split("-")[0]) + 1 if done else 0
        name = f"{number:06d}-{label}"
        tmp = self.root / f".tmp-{name}"
        failure = ""
        if dist.is_main_process():
            try:
                for stale in self.root.glob(".tmp-*"):  # left by a writer that was killed (the run lock: no other)
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as err:
                failure = f"rank 0: {err}"
        self._agree(failure, name, tmp, done)  # collective: the directory exists for everyone
        try:
            if engine is not None:
                engine.save_checkpoint(str(tmp / "engine"), tag="engine")  # collective
            (tmp / f"rng.{dist.get_rank()}.json").write_text(json.dumps(rng_state()))
        except (OSError, RuntimeError) as err:
            # torch.save, inside DeepSpeed's save_checkpoint, reports a full disk as a RuntimeError from its
            # stream writer ("unexpected pos", "basic_ios::clear: iostream error"), not as an OSError.
            failure = f"rank {dist.get_rank()}: {type(err).__name__}: {err}"
        self._agree(failure, name, tmp, done)  # collective: every rank's files are written
        if dist.is_main_process():
            try:
                state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
                save_file(state, str(tmp / "state.safetensors"))
                (tmp / "state.json").write_text(json.dumps(meta, indent=1))
                files = sorted(p for p in tmp.rglob("*") if p.is_file())
                manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
                os.replace(tmp, self.root / name)
                for old in self.complete()[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
            except (OSError, SafetensorError) as err:
                failure = f"rank 0: {type(err).__name__}: {err}"
        self._agree(failure, name, tmp, done)  # collective: the checkpoint is in place before anyone goes on
        return self.root / name

    def _agree(self, failure: str, name: str, tmp: Path, done: list[Path]) -> None:
        """Share whether any rank failed to write (one all-reduce); if one did, clean up and raise on all."""
        if not dist.any_rank(bool(failure)):
            return
        if dist.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        last = done[-1] if done else None
        raise CheckpointWriteError(
            f"writing checkpoint {name} into {self.root} failed ({failure or 'on another rank'}); the partial "
            f"checkpoint was removed and the last complete one, {last or 'none yet'}, is untouched: free space "
            "(or fix the file system) and run again with resume=auto"
        )

    @staticmethod
    def verify(path: Path) -> None:
        """Check every file against the manifest; raise naming the first mismatch."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointCorrupt(f"checkpoint {path}: unreadable {MANIFEST} ({err})") from None
        for rel, digest in manifest.items():
            file = path / rel
            if not file.exists():
                raise CheckpointCorrupt(f"checkpoint {path} is missing {rel}")
            if _sha256(file) != digest:
                raise CheckpointCorrupt(f"checkpoint {path}: {rel} does not match its manifest checksum")

    @staticmethod
    def verify_once_per_node(path: Path) -> None:
        """`verify` on one process per node (LOCAL_RANK 0), the verdict shared by all. Collective.

        Hashing a large checkpoint on every rank would read it world-size times; one
        reader per node still checks what each node's file system holds.
        """
        failure = ""
        if os.environ.get("LOCAL_RANK", "0") == "0":
            try:
                Checkpointer.verify(path)
            except CheckpointCorrupt as err:
                failure = str(err)
        if dist.any_rank(bool(failure)):
            raise CheckpointCorrupt(failure or f"checkpoint {path} failed verification on another node")

    @staticmethod
    def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Our state of a verified checkpoint (tensors, meta), and this rank's RNG restored. Collective."""
        Checkpointer.verify_once_per_node(path)
        rng = path / f"rng.{dist.get_rank()}.json"
        if rng.exists():
            set_rng_state(json.loads(rng.read_text()))
        return read_state(path)


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's own state (tensors, meta), read without verifying it (see `Checkpointer.load`)."""
    return load_file(str(path / "state.safetensors")), json.loads((path / "state.json").read_text())


def check_resumable(
    path: Path,
    meta: dict[str, Any],
    config: dict[str, Any],
    tasks_file: str,
    records: list[dict[str, Any]],
    stages: Callable[[int], Sequence[Sequence[int]]],
    method_problems: Callable[[dict[str, Any]], list[str]],
    world_size: int,
) -> None:
    """Refuse, before loading anything, a checkpoint this run cannot resume.

    `config` is this run's resolved config, `records` its task sequence
    (`data.spec.task_records`), `stages` its method's stage layout and
    `method_problems` what the method itself refuses (`Method.resume_problems`, given `meta`).
    Refused: fixed config keys that differ (`config.RESUME_FIXED_KEYS`); a task
    sequence that neither repeats nor continues the run's (its tasks first,
    unchanged, then new ones); more tasks where the method's stages of the run
    are not the first of the longer sequence's (joint), or mid-task; a mid-task
    checkpoint at another world size (DeepSpeed's optimizer shards).
    """
    if "config" not in meta:
        logger.warning("checkpoint %s predates config records: its compatibility is not checked", path)
        return
    saved = meta["task_sequence"]
    broken = continuation_error(saved, records)
    if broken:
        raise ValueError(
            f"the task sequence {tasks_file} does not continue the run of checkpoint {path}: {broken}. "
            f"Resuming needs the run's {len(saved)} tasks first, as they were (names, classes, instruction "
            "format, sample counts, shard checksums); new tasks may follow them. Or start afresh: "
            "resume=never, or another output_dir"
        )
    problems = resume_differences(meta["config"], config) + method_problems(meta)
    if problems:
        raise ValueError(
            f"checkpoint {path} was written with another config; these change the saved state's shapes or "
            "meaning, or which run it is (seed), and must stay as they were (or start afresh: resume=never, or "
            "another output_dir):\n  " + "\n  ".join(problems)
        )
    progress = meta["progress"]
    if len(records) > len(saved):
        before, after = [list(s) for s in stages(len(saved))], [list(s) for s in stages(len(records))]
        if after[: len(before)] != before:
            raise ValueError(
                f"checkpoint {path}: method={config['method']} trains all tasks in one stage, it cannot be "
                f"extended with {len(records) - len(saved)} more; start a run of the whole sequence instead"
            )
        if progress["phase"] != "start":
            raise ValueError(
                f"checkpoint {path} was written mid-task {progress['task']}: finish the run with its own "
                f"{len(saved)} tasks first, then extend it from its last task-boundary checkpoint (*-done)"
            )
    if progress["phase"] == "train" and meta["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {path} was written mid-task by {meta['world_size']} processes; resuming it needs the "
            f"same number (DeepSpeed's optimizer shards), this run has {world_size}. "
            "A task-boundary checkpoint (*-done) resumes at any world size."
        )


def restore_model_state(
    model: nn.Module, layers: Iterable[Any], tensors: dict[str, torch.Tensor], source: Path
) -> None:
    """Load a checkpoint's adapters (A, B, task status) and heads into `model`, freshly built from the
    pre-trained weights, and add the merged branches back into those weights (`layers`: its InfLoRALinear
    modules). Tasks the model has room for beyond the checkpoint's stay unused."""
    adapters = {n: t for n, t in tensors.items() if not n.startswith((MEMORY_PREFIX, STATS_PREFIX, METHOD_PREFIX))}
    unknown = set(adapters) - set(model.state_dict())
    if unknown:
        raise RuntimeError(f"checkpoint {source} does not fit this model: unknown tensors {sorted(unknown)[:5]}")
    model.load_state_dict(adapters, strict=False)
    for layer in layers:
        layer.reapply_merges()  # the pre-trained weights were just loaded afresh


def class_statistics_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The class statistics' own state (`ClassStatistics.load_state_dict`) among a checkpoint's tensors."""
    return {n[len(STATS_PREFIX) :]: t for n, t in tensors.items() if n.startswith(STATS_PREFIX)}
