"""Export a continual run: its subspace state and class statistics for analysis or reuse, the adapter in
PEFT's LoRA format, and the merged model as plain transformers weights.

Five exports:

* `export_continual_state` writes every input group's designed down-projections
  A_t and its protected old-task basis as safetensors, with a JSON sidecar of the
  DualGPM bookkeeping (mode, thresholds, members, task names).
* `export_peft_adapter` writes the accumulated adapter, sum_t B_t A_t over every
  started task, as a plain PEFT LoRA adapter: per wrapped layer the tasks' factors
  are concatenated, lora_A = [A_0; ...; A_t] (r n, d_in) and
  lora_B = [B_0, ..., B_t] (d_out, r n), so that lora_B @ lora_A = sum_t B_t A_t
  (times the layer's scaling, folded into lora_B), with PEFT's scaling lora_alpha / r = 1.
  `peft.PeftModel.from_pretrained(base, directory)` on the *original* pre-trained
  model then computes what the InfLoRA model does.

* `export_class_statistics` writes the seen classes' means and covariances
  (classification runs), the state of prototype prediction and classifier alignment.
* `export_merged_model` writes the adapted model as a plain transformers
  checkpoint, every branch merged into the weights (W + sum_t B_t A_t, in W's
  dtype): `AutoModel*.from_pretrained` loads it with no inflora_dist installed;
  for vision, `export_classifier_heads` writes the heads and the class map beside it.

No function imports peft: the adapter files are written directly, in the
layout PEFT's `save_pretrained` produces (checked against peft 0.21 in the tests).

`written_atomically(target)` makes a folder export atomic: it is written into a
temporary folder beside the target and renamed into place when complete, an
earlier export there is replaced whole, and a failed write removes the partial
folder and raises ExportWriteError naming the folder and the cause. An export
owns only its folder: the target must be absent, an empty folder, or an earlier
export (its marker file, `EXPORT_MARKER`, lists every entry it wrote); anything
else (a file, a run directory, a folder holding a run or other files) is
refused before anything is written (`check_export_target`, ExportTargetRefused).
The trainer and `export_model` write the PEFT adapter and the merged model
through it; the single-file exports (continual state, class statistics) are
each written to a temporary file and renamed.

The continual state, class statistics and heads are read from what every rank
holds (A is a buffer, the memories are broadcast by `InfLoRA`, the statistics
reduced). Under DeepSpeed ZeRO-3, `export_peft_adapter` gathers B and
`export_merged_model` every parameter, one layer at a time: call them on every
rank. Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from inflora_dist import dist
from inflora_dist.class_stats import ClassStatistics
from inflora_dist.continual import InfLoRA
from inflora_dist.errors import UserError, WriteError
from inflora_dist.inject import InjectionReport
from inflora_dist.layer import FROZEN, MERGED, TRAINING, UNUSED, InfLoRALinear

#: Format tag and version of the continual-state sidecar.
CONTINUAL_STATE_FORMAT = "inflora_dist.continual_state"
CONTINUAL_STATE_VERSION = 1

#: Format tag and version of the class-statistics sidecar.
CLASS_STATISTICS_FORMAT = "inflora_dist.class_statistics"
CLASS_STATISTICS_VERSION = 1

#: Format tag, version and file names of the heads written beside a merged vision backbone.
CLASSIFIER_FORMAT = "inflora_dist.classifier"
CLASSIFIER_VERSION = 1
HEADS_NAME = "heads.safetensors"
CLASSES_NAME = "classes.json"

#: The file a folder export writes last, listing its entries: it marks the folder as an export that a later
#: export may replace whole.
EXPORT_MARKER = "inflora_export.json"
EXPORT_FORMAT = "inflora_dist.export"
EXPORT_VERSION = 1

#: File names of a PEFT adapter directory.
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"

_STATUS_NAMES = {UNUSED: "unused", TRAINING: "training", FROZEN: "frozen", MERGED: "merged"}


class ExportWriteError(WriteError):
    """An export could not be written (a full disk, a quota): the partial output was removed, and what the
    target held before is untouched."""


class ExportTargetRefused(UserError, ValueError):
    """An export's target holds something that is not an earlier export: nothing was written or removed."""


def check_export_target(target: str | Path) -> None:
    """Refuse, naming the path and why, a folder export target that is not the export's to replace: it must
    be absent, an empty folder, or an earlier export whose marker (`EXPORT_MARKER`) lists every entry the
    folder holds. A file, a symbolic link, a run directory, a folder holding a run or anything else is
    refused (ExportTargetRefused)."""
    target = Path(target)
    if target.is_symlink():
        raise ExportTargetRefused(f"export target {target} is a symbolic link: name a folder of its own")
    if not target.exists():
        return
    if not target.is_dir():
        raise ExportTargetRefused(f"export target {target} is a file, not an export folder: name another path")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    listed = _export_entries(target / EXPORT_MARKER)
    if listed is None:
        what = "is a run directory" if {"config.yaml", "checkpoints"} <= set(entries) else "is not an export"
        raise ExportTargetRefused(
            f"export target {target} {what}: it holds {_some(entries)} and no {EXPORT_MARKER} (the mark of an "
            "earlier export, which an export replaces whole); name a new or empty folder"
        )
    foreign = sorted(set(entries) - set(listed) - {EXPORT_MARKER})
    if foreign:
        raise ExportTargetRefused(
            f"export target {target} is an earlier export that also holds {_some(foreign)}, which the export did "
            "not write and replacing it would delete: move them out, or name a new or empty folder"
        )


def check_export_targets(targets: Sequence[str | Path]) -> None:
    """`check_export_target` of each of `targets` on the main process, its refusal raised on every rank.
    Collective (one all-reduce)."""
    refused = ""
    if dist.is_main_process():
        try:
            for target in targets:
                check_export_target(target)
        except ExportTargetRefused as err:
            refused = str(err)
    dist.raise_agreed(refused, ExportTargetRefused)  # collective


def _export_entries(marker: Path) -> list[str] | None:
    """The entries an export marker lists; None when `marker` is missing or not one of ours."""
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("format") != EXPORT_FORMAT:
        return None
    return [str(name) for name in content.get("entries", [])]


def _some(names: Sequence[str], shown: int = 5) -> str:
    """'a, b, c' (and 'and N more')."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@contextlib.contextmanager
def written_atomically(target: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to write a folder export into; when the block completes it
    replaces `target` whole (no file of an earlier export survives), with the marker that lets a later
    export replace it in turn.

    A target that is not an earlier export (`check_export_target`) is refused on
    every rank before anything is written. A write that fails on the main
    process (OSError, SafetensorError) removes the partial folder, leaves
    `target` as it was and raises ExportWriteError naming the folder and the
    cause, on every rank (an all-reduce as the block starts and one as it ends:
    collective; only the main process touches the file system).
    """
    target = Path(target)
    tmp = target.parent / f".{target.name}.partial"
    main, failure = dist.is_main_process(), ""
    check_export_targets([target])  # collective
    if main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that was killed
            tmp.mkdir(parents=True)
        except OSError as err:
            failure = f"{type(err).__name__}: {err}"
    _agree_on_export(failure, target, tmp)  # collective
    try:
        yield tmp
    except (OSError, SafetensorError) as err:
        failure = f"{type(err).__name__}: {err}"
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main and not failure:
        try:
            entries = sorted(p.name for p in tmp.iterdir())
            _write_json(tmp / EXPORT_MARKER, {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "entries": entries})
            _replace_folder(tmp, target)
        except OSError as err:
            failure = f"{type(err).__name__}: {err}"
    _agree_on_export(failure, target, tmp)  # collective


def _agree_on_export(failure: str, target: Path, tmp: Path) -> None:
    """Whether the main process failed to write (one all-reduce); if it did, remove the partial folder and
    raise ExportWriteError on every rank."""
    if not dist.any_rank(bool(failure)):
        return
    if dist.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    kept = "is as it was" if target.exists() else "does not exist"
    raise ExportWriteError(
        f"writing the export {target} failed ({failure or 'on the main process'}); the partial export was "
        f"removed and {target} {kept}: free space (or fix the file system) and export again"
    )


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, replacing whatever is there whole (restored if the rename fails)."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_pair(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, sidecar: Path, content: dict
) -> None:
    """A safetensors file and its JSON sidecar, each written to a temporary name and then renamed: a reader never
    sees a partial file. A failure removes the temporary files and raises ExportWriteError naming both."""
    tmp_tensors, tmp_json = (p.parent / f".{p.name}.partial" for p in (path, sidecar))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp_tensors), metadata=metadata)
        _write_json(tmp_json, content)
        os.replace(tmp_tensors, path)
        os.replace(tmp_json, sidecar)
    except (OSError, SafetensorError) as err:
        tmp_tensors.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
        raise ExportWriteError(f"writing {path} and {sidecar} failed ({type(err).__name__}: {err})") from err


def _started_tasks(layer: InfLoRALinear) -> list[int]:
    """Tasks whose A was installed: training, frozen or merged (in task order)."""
    return [t for t in range(layer.num_tasks) if layer.status(t) != UNUSED]


def _tensor_out(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached, contiguous CPU copy that owns its memory (safetensors refuses views of shared storage)."""
    out = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype)
    return out.clone(memory_format=torch.contiguous_format)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- continual state
def sidecar_path(path: str | Path) -> Path:
    """Where `export_continual_state` writes the JSON sidecar of `path`: the same name with suffix `.json`."""
    return Path(path).with_suffix(".json")


def export_continual_state(inflora: InfLoRA, path: str | Path, task_names: Sequence[str] | None = None) -> None:
    """Write each input group's A_t and old-task basis to `path` (safetensors) and a JSON sidecar next to it.

    Tensors, per input group `<group>` (names as in `inflora.report.groups`):
      * `<group>.A.<t>`: the frozen down-projection A_t (rank, d) of every started task t
        (training, frozen or merged), as stored in the layer buffer (the adapter dtype,
        float32 by default) of the group's first member; all members share it.
      * `<group>.old_basis`: the orthonormal basis (d, k) of the protected old-task
        subspace, float64, from `SubspaceMemory.old_basis()` whichever DualGPM mode the
        memory stores (in "retain" mode it is computed from the stored free-space basis,
        so it spans the same subspace but is not the stored tensor). Before any task has
        ended it has shape (d, 0); safetensors stores empty tensors, so it is always written.

    The sidecar `sidecar_path(path)` (e.g. `continual_state.safetensors` ->
    `continual_state.json`) holds the task names, the number of finished tasks, each
    task's status, and per group: mode, dim, protected_dim, lambda_begin, lambda_end,
    the energy threshold of every task index (0 .. num_tasks - 1), the member module
    names and the started task indices.

    `task_names` defaults to `task_<t>` for each started task; when given it must name at
    least every started task and at most `num_tasks` tasks. Raises ValueError when the
    wrapped layers disagree on the tasks' status (they are started and finished
    together by `InfLoRA`), or when `path` itself ends in `.json`.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    if sidecar == path:
        raise ValueError(f"path {str(path)!r} would be overwritten by its JSON sidecar; use e.g. a .safetensors suffix")
    report = inflora.report
    statuses = {name: [layer.status(t) for t in range(layer.num_tasks)] for name, layer in report.layers.items()}
    status = next(iter(statuses.values()))
    differing = sorted(name for name, s in statuses.items() if s != status)
    if differing:
        raise ValueError(f"wrapped layers disagree on the task status; {differing[:4]} differ from the first layer")
    started = [t for t, s in enumerate(status) if s != UNUSED]
    finished = [t for t, s in enumerate(status) if s in (FROZEN, MERGED)]
    if task_names is None:
        names = [f"task_{t}" for t in started]
    else:
        names = [str(n) for n in task_names]
        if not len(started) <= len(names) <= inflora.num_tasks:
            raise ValueError(
                f"task_names must name between {len(started)} (the started tasks) and {inflora.num_tasks} "
                f"(num_tasks) tasks, got {len(names)}"
            )

    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}
    for group, members in report.groups.items():
        first = report.layers[members[0]]
        for t in started:
            tensors[f"{group}.A.{t}"] = _tensor_out(first.lora_A[t])
        memory = inflora.memories[group]
        old = _tensor_out(memory.old_basis(), torch.float64)
        tensors[f"{group}.old_basis"] = old
        groups[group] = {
            "mode": memory.mode,
            "dim": memory.dim,
            "protected_dim": memory.protected_dim,
            "old_basis_shape": list(old.shape),
            "lambda_begin": memory.lambda_begin,
            "lambda_end": memory.lambda_end,
            "thresholds": [memory.threshold(t) for t in range(memory.num_tasks)],
            "members": list(members),
            "started_tasks": started,
        }
    sidecar_content = {
        "format": CONTINUAL_STATE_FORMAT,
        "version": CONTINUAL_STATE_VERSION,
        "rank": inflora.rank,
        "num_tasks": inflora.num_tasks,
        "task_names": names,
        "num_finished_tasks": len(finished),
        "task_status": [_STATUS_NAMES[s] for s in status],
        "groups": groups,
    }
    if dist.is_main_process():
        _write_pair(path, tensors, {"format": CONTINUAL_STATE_FORMAT}, sidecar, sidecar_content)


# ---------------------------------------------------------------------- PEFT adapter
def stacked_factors(layer: InfLoRALinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A_cat (r n, d_in), B_cat (d_out, r n)) over the layer's n started tasks; None when none started.

    Finished tasks count whether merged into the base weight or not: the result
    is relative to the original pre-trained weight. Gathers B under ZeRO-3 (collective).
    """
    tasks = _started_tasks(layer)
    if not tasks:
        return None
    bs = [layer.lora_B(t) for t in tasks]
    with dist.gathered_params(bs):
        # The layer's scaling goes into B, so that PEFT's own scaling stays 1.
        b_cat = torch.cat([_tensor_out(b) * layer.scaling if layer.scaling != 1.0 else _tensor_out(b) for b in bs],
                          dim=1)  # fmt: skip
    a_cat = _tensor_out(layer.lora_A[tasks].reshape(len(tasks) * layer.rank, layer.in_features))
    training = layer.active_task
    if layer.train_A and training is not None:  # the training A is the parameter, not yet the buffer
        with dist.gathered_params([layer.lora_A_active]):
            row = tasks.index(training) * layer.rank
            a_cat[row : row + layer.rank] = _tensor_out(layer.lora_A_active, a_cat.dtype)
    return a_cat, b_cat


def export_peft_adapter(
    model: nn.Module,
    report: InjectionReport,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Write the accumulated adapter of every started task as a PEFT LoRA adapter in `directory`.

    For each wrapped layer with n started tasks (training, frozen or merged; a
    merged task is exported too, since the adapter applies to the original
    weights), lora_A stacks A_0..A_t to (rank n, d_in) and lora_B concatenates
    B_0..B_t to (d_out, rank n); `r` is rank n and `lora_alpha` equals it, so
    PEFT's scaling is 1. Layers with no started task are left out; layers whose
    n differs from the most common one get `rank_pattern` / `alpha_pattern`
    entries.

    Files, as PEFT's `save_pretrained` writes them:
      * `adapter_config.json`: peft_type "LORA", `task_type` (None gives a plain
        `PeftModel`; e.g. "CAUSAL_LM" a `PeftModelForCausalLM`), target_modules = the
        exact names of the exported modules, r, lora_alpha, lora_dropout 0,
        bias "none", use_rslora False, fan_in_fan_out (True for transformers
        Conv1D targets such as GPT-2's), base_model_name_or_path (defaults to
        `model.config.name_or_path` when the model has a non-empty one).
      * `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` and
        `.lora_B.weight`, in the adapter dtype (the adapter name is not part of the keys).

    Load it with `peft.PeftModel.from_pretrained(base, directory)` where `base` is
    the same model class with the pre-trained weights (no InfLoRA merges), so that
    module names match. `model` is only read for its config; it may be the
    injected model. Under ZeRO-3 call it on every rank (B is gathered); only the
    main process writes.

    Raises ValueError when no task has been started, or when the targets mix
    nn.Linear and Conv1D layers (PEFT's config has a single fan_in_fan_out flag).
    """
    directory = Path(directory)
    fan_in_fan_out = {layer.fan_in_fan_out for layer in report.layers.values()}
    if len(fan_in_fan_out) > 1:
        conv = sorted(n for n, layer in report.layers.items() if layer.fan_in_fan_out)
        linear = sorted(n for n, layer in report.layers.items() if not layer.fan_in_fan_out)
        raise ValueError(
            "PEFT's LoraConfig has one fan_in_fan_out flag for all targets, but the wrapped layers mix "
            f"transformers Conv1D ({conv[:2]}...) and nn.Linear ({linear[:2]}...); export them separately"
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in report.layers.items():
        factors = stacked_factors(layer)
        if factors is None:
            continue
        a_cat, b_cat = factors
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_cat
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_cat
        ranks[name] = a_cat.shape[0]
    if not ranks:
        raise ValueError("no task has been started in any wrapped layer: there is no adapter to export")

    r = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes against the module name's suffix: escape the full names.
    rank_pattern = {re.escape(name): n for name, n in ranks.items() if n != r}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "target_modules": sorted(ranks),
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if dist.is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(directory / PEFT_CONFIG_NAME, config)


# ---------------------------------------------------------------------- class statistics
def export_class_statistics(
    statistics: ClassStatistics, path: str | Path, class_ids: Sequence[int], offsets: Sequence[int],
    task_names: Sequence[str],
) -> None:  # fmt: skip
    """Write the seen classes' statistics to `path` (safetensors) and a JSON sidecar next to it.

    Tensors (`ClassStatistics.state_dict`): `counts` (classes,), `means` (classes, d)
    and, by form, `covariances` ((classes, d, d) full, (classes, d) diagonal) or
    `scatter` (d, d) and `dof` (shared: covariance = scatter / dof + reg I). Row k
    is the class at logit position k; the sidecar maps positions to dataset labels
    (`class_ids`) and tasks (`task_offsets`, `task_names`), with the form and
    regulariser. Call it on one process (the statistics are the same on every rank).
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    if sidecar == path:
        raise ValueError(f"path {str(path)!r} would be overwritten by its JSON sidecar; use e.g. a .safetensors suffix")
    seen = len(statistics)
    tensors = {k: _tensor_out(v) for k, v in statistics.state_dict().items()}
    _write_pair(
        path,
        tensors,
        None,
        sidecar,
        {
            "format": CLASS_STATISTICS_FORMAT,
            "version": CLASS_STATISTICS_VERSION,
            "form": statistics.form,
            "covariance_reg": statistics.reg,
            "dim": statistics.dim,
            "class_ids": list(class_ids[:seen]),
            "task_offsets": [o for o in offsets if o <= seen],
            "task_names": list(task_names[: sum(1 for o in offsets[1:] if o <= seen)]),
        },
    )


# ---------------------------------------------------------------------- merged model
def merged_state_dict(model: nn.Module, report: InjectionReport, prefix: str = "", merge: bool = True
                      ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The state of the modules under `prefix` in their original (unwrapped) names, every branch merged.

    Each wrapped layer's weight becomes W + sum of B_t A_t over its started but
    unmerged tasks (merged ones are already in W), computed in float32 and cast
    to W's dtype (`merge` False: W as it is, the unmerged branches left out);
    everything else is copied as it is. Names lose `prefix` (e.g.
    "backbone." for a vision classifier). Under ZeRO-3 each module's parameters
    are gathered in turn (collective: call it on every rank); the copies are on
    the main process's host only (the other ranks return an empty dict: no rank
    but the writer holds the whole model).
    """
    inside = tuple(f"{name}." for name in report.layers)
    state: dict[str, torch.Tensor] = {}
    keep = dist.is_main_process()

    def key(name: str) -> str:
        return name[len(prefix) :]

    for name, module in model.named_modules():
        if not name.startswith(prefix) or name.startswith(inside) or isinstance(module, InfLoRALinear):
            continue
        own = dict(module.named_parameters(recurse=False))
        with dist.gathered_params(own.values()):  # collective under ZeRO-3
            for n, p in own.items():
                if keep:
                    state[key(f"{name}.{n}" if name else n)] = _tensor_out(p)
        for n, b in module.named_buffers(recurse=False):
            if keep and n not in module._non_persistent_buffers_set:
                state[key(f"{name}.{n}" if name else n)] = _tensor_out(b)
    for name, layer in report.layers.items():
        if not name.startswith(prefix):
            continue
        base = layer.base_layer
        live = layer.live_tasks() if merge else []
        params = [*base.parameters(), *(layer.lora_B(t) for t in live)]
        with dist.gathered_params(params):  # collective under ZeRO-3
            if not keep:
                continue
            weight = base.weight.detach().float()
            for t in live:
                weight = weight + layer.weight_delta(t)
            state[key(f"{name}.weight")] = _tensor_out(weight, base.weight.dtype)
            if base.bias is not None:
                state[key(f"{name}.bias")] = _tensor_out(base.bias)
    return state


def export_merged_model(
    model: nn.Module,
    report: InjectionReport,
    directory: str | Path,
    prefix: str = "",
    max_shard_size: str = "2GB",
) -> Path:
    """Write a plain transformers checkpoint of the adapted model, branches merged, to `directory`.

    `model` is the injected transformers model, or a module holding it under
    `prefix` (the vision classifier's "backbone."): that submodule's
    `save_pretrained` writes config.json and sharded safetensors, so
    `AutoModel*.from_pretrained(directory)` loads it with no inflora_dist
    installed. Collective under ZeRO-3 (the parameters are gathered); only the
    main process writes.
    """
    target = model.get_submodule(prefix.rstrip(".")) if prefix else model
    if not hasattr(target, "save_pretrained"):
        raise TypeError(f"{type(target).__name__} is not a transformers model (no save_pretrained)")
    state = merged_state_dict(model, report, prefix)
    directory = Path(directory)
    if dist.is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        target.save_pretrained(directory, state_dict=state, safe_serialization=True, max_shard_size=max_shard_size)
    return directory


def export_classifier_heads(
    heads: Sequence[nn.Module],
    directory: str | Path,
    class_ids: Sequence[int],
    offsets: Sequence[int],
    task_names: Sequence[str],
    preprocess: dict[str, Any],
    class_names: Sequence[str | None] | None = None,
) -> None:
    """Write `heads.safetensors` (head t's `t.weight` / `t.bias`, float32) and `classes.json` beside a merged
    backbone: what a plain transformers user needs to classify with it.

    classes.json holds the logit position -> class id map (and name, when the task spec names its
    classes), each task's logit range, the heads' cosine scale, the preprocessing and how the features are
    read (the backbone's `last_hidden_state[:, 0]`). Class-incremental
    prediction is the argmax over all heads' concatenated logits. Collective
    under ZeRO-3 (the heads are gathered); only the main process writes.
    """
    tensors: dict[str, torch.Tensor] = {}
    for t, head in enumerate(heads):
        with dist.gathered_params(head.parameters()):  # collective under ZeRO-3
            for n, p in head.named_parameters():
                tensors[f"{t}.{n}"] = _tensor_out(p, torch.float32)
    if not dist.is_main_process():
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / HEADS_NAME), metadata={"format": CLASSIFIER_FORMAT})
    _write_json(
        directory / CLASSES_NAME,
        {
            "format": CLASSIFIER_FORMAT,
            "version": CLASSIFIER_VERSION,
            "features": "last_hidden_state[:, 0]",
            "cosine_scale": float(getattr(heads[0], "cosine_scale", 0.0)) if heads else 0.0,
            "preprocess": dict(preprocess),
            "class_ids": [int(c) for c in class_ids],
            "class_names": list(class_names) if class_names and any(class_names) else None,
            "tasks": [
                {"name": name, "logits": [int(offsets[t]), int(offsets[t + 1])]} for t, name in enumerate(task_names)
            ],
        },
    )
