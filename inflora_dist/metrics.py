"""Continual-learning metrics of an accuracy matrix, a JSON saver, a text table and plots.

``R[i][j]`` is the accuracy in percent on task ``j`` after training task ``i``, for
``j <= i``; entries above the diagonal are never needed, so row ``i`` holds exactly
``i + 1`` values. With ``n`` rows so far (a run may be in progress, ``n <= T``):

* ``A_i = mean_{j <= i} R[i][j]``; **avg_acc** is ``A_{n-1}``.
* **avg_incremental_acc** ``= mean_{i < n} A_i``.
* **bwt** (backward transfer, Lopez-Paz & Ranzato 2017)
  ``= mean_{j < n-1} (R[n-1][j] - R[j][j])``; ``0.0`` with one row.
* **forgetting** (Chaudhry et al. 2018)
  ``= mean_{j < n-1} (max_{j <= l <= n-2} R[l][j] - R[n-1][j])``; ``0.0`` with one row.
  It is not clamped at zero: a task that improved since its best earlier
  accuracy contributes a negative term, as in the paper.
* **ap** and **ft**, the average performance and forgetting of the LLM continual-learning papers
  (O-LoRA, GainLoRA; GainLoRA's ``score.py``, ``cal_continue_learning_metrics``: ``Cl`` and ``Fgt``):
  ``AP = mean_j R[n-1][j]`` and ``FT = mean_{j < n-1} (max_{l <= n-2} R[l][j] - R[n-1][j])``. That code
  fills the matrix's upper triangle with zeros, so its maximum over ``l < j`` never wins against scores
  ``>= 0``: AP is **avg_acc** and FT is **forgetting**, stored under the papers' names as well. (Its
  ``Bwt`` divides by ``n``, counting the last task's zero term; **bwt** here divides by ``n - 1``.)
* **pooled accuracy**, the InfLoRA paper's metric (the reference's ``accuracy(...)['total']``, logged as its
  "CNN top1 curve"): after task ``i`` the accuracy over every eval sample of tasks ``0..i`` together,
  ``P_i = sum_{j<=i} R[i][j] n_j / sum_{j<=i} n_j`` with ``n_j`` task ``j``'s number of eval samples
  (``R[i][j] = 100 c_j / n_j``, so ``P_i = 100 sum c_j / sum n_j``). **pooled_final** is ``P_{n-1}`` (the
  paper's final accuracy) and **pooled_avg** ``mean_i P_i`` (its average accuracy). With tasks of unequal
  size (ImageNet-R) ``P_{n-1}`` is not **avg_acc**, which weighs every task alike.

The metric functions are pure and take the rows; :class:`AccuracyMatrix` wraps
them with validation. matplotlib is imported only inside :func:`save_plots`.
``python -m inflora_dist.metrics summarize RUN_DIR...`` prints the mean and standard deviation of the
metrics over runs (seeds): :func:`summarize_runs`.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from inflora_dist.errors import run_command
from inflora_dist.writes import atomic_write, write_json

__all__ = [
    "AccuracyMatrix",
    "JointScores",
    "MatrixScores",
    "Scores",
    "average_accuracies",
    "average_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "forgetting",
    "format_table",
    "pooled_accuracies",
    "pooled_metrics",
    "save_metrics",
    "save_plots",
    "summarize_runs",
]

Rows = Sequence[Sequence[float]]

METRIC_KEYS = ("avg_acc", "avg_incremental_acc", "bwt", "forgetting", "ap", "ft")
MATRIX_KEY = "accuracy_matrix"
_RESERVED_KEYS = frozenset((MATRIX_KEY, *METRIC_KEYS))


# --------------------------------------------------------------------------- pure metric functions


def _require_rows(rows: Rows) -> int:
    if len(rows) == 0:
        raise ValueError("the accuracy matrix has no rows yet: train and evaluate at least one task first")
    return len(rows)


def average_accuracies(rows: Rows) -> list[float]:
    """``A_i = (1/(i+1)) sum_{j<=i} R[i][j]`` for every row ``i`` (average accuracy after each task)."""
    return [math.fsum(row[: i + 1]) / (i + 1) for i, row in enumerate(rows)]


def average_accuracy(rows: Rows) -> float:
    """Average accuracy over the tasks seen so far, after the last trained task (``A_{n-1}``)."""
    n = _require_rows(rows)
    return math.fsum(rows[n - 1][:n]) / n


def average_incremental_accuracy(rows: Rows) -> float:
    """Mean of ``A_i`` over all rows so far."""
    n = _require_rows(rows)
    return math.fsum(average_accuracies(rows)) / n


def backward_transfer(rows: Rows) -> float:
    """``(1/(n-1)) sum_{j<n-1} (R[n-1][j] - R[j][j])``; ``0.0`` with a single row. Negative means forgetting."""
    n = _require_rows(rows)
    if n == 1:
        return 0.0
    last = rows[n - 1]
    return math.fsum(last[j] - rows[j][j] for j in range(n - 1)) / (n - 1)


def forgetting(rows: Rows) -> float:
    """Mean over old tasks ``j`` of ``max_{l in [j, n-2]} R[l][j] - R[n-1][j]``; ``0.0`` with a single row."""
    n = _require_rows(rows)
    if n == 1:
        return 0.0
    last = rows[n - 1]
    terms = (max(rows[k][j] for k in range(j, n - 1)) - last[j] for j in range(n - 1))
    return math.fsum(terms) / (n - 1)


def pooled_accuracies(rows: Rows, eval_counts: Sequence[int]) -> list[float]:
    """The accuracy over every eval sample of the tasks scored in each row, pooled: for row ``i``,
    ``sum_j R[i][j] n_j / sum_j n_j`` over its entries ``j``, ``n_j = eval_counts[j]`` (the number of eval
    samples of task ``j``). That is ``100 * correct / samples`` over those tasks, the paper's accuracy.

    Row ``i`` of a sequence scores tasks ``0..i``; a joint run's single row scores all tasks at once, and
    its pooled value is over all of them.

    Raises:
        ValueError: a row has more entries than ``eval_counts``, a count is negative or not an integer,
            or a row's tasks hold no eval sample.
    """
    counts: list[int] = []
    for j, c in enumerate(eval_counts):
        try:
            n = operator.index(c) if not isinstance(c, bool) else -1
        except TypeError:
            n = -1
        if n < 0:
            raise ValueError(f"eval_counts[{j}] must be a number of eval samples (an int >= 0), got {c!r}")
        counts.append(n)
    out: list[float] = []
    for i, row in enumerate(rows):
        if len(row) > len(counts):
            raise ValueError(f"row {i} scores {len(row)} tasks but eval_counts has {len(counts)} counts")
        total = sum(counts[: len(row)])
        if total == 0:
            raise ValueError(f"row {i}: its tasks 0..{len(row) - 1} have no eval samples to pool")
        out.append(math.fsum(float(r) * n for r, n in zip(row, counts, strict=False)) / total)
    return out


def pooled_metrics(rows: Rows, eval_counts: Sequence[int]) -> dict[str, Any]:
    """``pooled_acc`` (:func:`pooled_accuracies`, one value per row), ``pooled_final`` (its last value: the
    paper's final accuracy) and ``pooled_avg`` (its mean: the paper's average accuracy); metrics.json's keys."""
    _require_rows(rows)
    pooled = pooled_accuracies(rows, eval_counts)
    return {"pooled_acc": pooled, "pooled_final": pooled[-1], "pooled_avg": math.fsum(pooled) / len(pooled)}


# --------------------------------------------------------------------------- the matrix


class AccuracyMatrix:
    """A lower-triangular accuracy matrix, grown one row per trained task.

    Args:
        rows: initial rows, each validated as by :meth:`add_row`.
        num_tasks: the total number of tasks ``T`` when known; rows beyond it are
            rejected and :func:`format_table` shows all ``T`` columns.
    """

    def __init__(self, rows: Rows | None = None, num_tasks: int | None = None) -> None:
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self.rows: list[list[float]] = []
        for row in rows or ():
            self.add_row(row)

    def add_row(self, row: Sequence[float]) -> None:
        """Append the accuracies (percent, in ``[0, 100]``) on tasks ``0..i`` after training task ``i``.

        Raises:
            ValueError: the row does not have ``len(self) + 1`` entries, the matrix
                already has ``num_tasks`` rows, or a value is not a finite number in ``[0, 100]``.
        """
        i = len(self.rows)
        if self.num_tasks is not None and i >= self.num_tasks:
            raise ValueError(f"the matrix already has all {self.num_tasks} rows (num_tasks={self.num_tasks})")
        values = list(row)
        if len(values) != i + 1:
            raise ValueError(f"row {i} (after task {i}) must have {i + 1} accuracies (tasks 0..{i}), got {len(values)}")
        checked: list[float] = []
        for j, v in enumerate(values):
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"R[{i}][{j}] must be a number, got {v!r}") from None
            if not (math.isfinite(f) and 0.0 <= f <= 100.0):
                raise ValueError(f"R[{i}][{j}] = {v!r} is not an accuracy in percent in [0, 100]")
            checked.append(f)
        self.rows.append(checked)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"AccuracyMatrix(rows={self.rows!r}, num_tasks={self.num_tasks!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccuracyMatrix):
            return NotImplemented
        return self.rows == other.rows and self.num_tasks == other.num_tasks

    __hash__ = None  # type: ignore[assignment]  # mutable

    @property
    def average_accuracies(self) -> list[float]:
        """``A_i`` after each trained task."""
        return average_accuracies(self.rows)

    @property
    def avg_acc(self) -> float:
        """Average accuracy after the last trained task; ValueError when empty."""
        return average_accuracy(self.rows)

    @property
    def avg_incremental_acc(self) -> float:
        """Mean of the average accuracies after each task; ValueError when empty."""
        return average_incremental_accuracy(self.rows)

    @property
    def bwt(self) -> float:
        """Backward transfer; ``0.0`` with one row, ValueError when empty."""
        return backward_transfer(self.rows)

    @property
    def forgetting(self) -> float:
        """Average forgetting; ``0.0`` with one row, ValueError when empty."""
        return forgetting(self.rows)

    def metrics(self) -> dict[str, float]:
        """The metrics by name: ``avg_acc``, ``avg_incremental_acc``, ``bwt``, ``forgetting``, and the LLM
        papers' ``ap`` (= avg_acc) and ``ft`` (= forgetting) under their own names (see the module docstring)."""
        return {
            "avg_acc": self.avg_acc,
            "avg_incremental_acc": self.avg_incremental_acc,
            "bwt": self.bwt,
            "forgetting": self.forgetting,
            "ap": self.avg_acc,
            "ft": self.forgetting,
        }

    def to_dict(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A JSON-ready dict: ``accuracy_matrix`` (row ``i`` has ``i + 1`` values) and the metrics.

        The metrics are ``None`` while the matrix is empty. ``num_tasks`` is
        included when set. ``extra`` keys (task names, a task-incremental matrix
        under ``"task_incremental_accuracy_matrix"``, ...) are added; an
        :class:`AccuracyMatrix` value is stored as its rows. Extra keys may not
        shadow the matrix or metric keys.
        """
        out: dict[str, Any] = {MATRIX_KEY: [list(r) for r in self.rows]}
        if self.rows:
            out.update(self.metrics())
        else:
            out.update(dict.fromkeys(METRIC_KEYS))
        if self.num_tasks is not None:
            out["num_tasks"] = self.num_tasks
        for key, value in (extra or {}).items():
            if key in _RESERVED_KEYS or (key == "num_tasks" and self.num_tasks is not None):
                raise ValueError(f"extra key {key!r} would overwrite a computed entry")
            out[key] = [list(r) for r in value.rows] if isinstance(value, AccuracyMatrix) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: str = MATRIX_KEY) -> AccuracyMatrix:
        """Rebuild from :meth:`to_dict` output (or a loaded metrics JSON); rows are re-validated.

        ``key`` selects another stored matrix, e.g. ``"task_incremental_accuracy_matrix"``.
        Stored metric values are ignored: they are recomputed from the rows.
        """
        if key not in data:
            raise KeyError(f"no {key!r} in the metrics dict (keys: {sorted(data)})")
        num_tasks = data.get("num_tasks")
        return cls(rows=data[key], num_tasks=int(num_tasks) if num_tasks is not None else None)


# --------------------------------------------------------------------------- saving


def save_metrics(
    path: str | os.PathLike[str], matrix: AccuracyMatrix | Scores, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``matrix.to_dict(extra)`` (an accuracy matrix, or a run's scores) as JSON to ``path`` atomically;
    returns the path.

    Call it from one process only (rank 0). Parent directories are created.
    """
    p = Path(path)
    write_json(p, matrix.to_dict(extra))
    return p


# --------------------------------------------------------------------------- table


def _names(task_names: Sequence[str] | None, count: int) -> list[str]:
    if task_names is None:
        return [f"task {j}" for j in range(count)]
    if len(task_names) < count:
        raise ValueError(f"task_names has {len(task_names)} names but the matrix needs {count}")
    return [str(name) for name in task_names[:count]]


def format_table(
    matrix: AccuracyMatrix, task_names: Sequence[str] | None = None, zero_shot: Sequence[float | None] | None = None
) -> str:
    """A fixed-width text table of the matrix followed by the four metrics with 2 decimals (AP and FT are
    two of them under other names).

    Rows are "after <task>", columns are tasks (``num_tasks`` columns when set,
    else one per row); cells above the diagonal are blank. ``zero_shot`` (one score per
    column, None for a blank) is shown first, as the row "zero-shot".
    """
    n = len(matrix)
    cols = max(n, matrix.num_tasks or 0)
    names = _names(task_names, cols)
    row_labels = [f"after {names[i]}" for i in range(n)]
    label_w = max([len("zero-shot" if zero_shot is not None else "after"), *map(len, row_labels)])
    widths = [max(len(name), 6) for name in names]  # 6 = len("100.00")

    lines = ["  ".join([" " * label_w, *(name.rjust(w) for name, w in zip(names, widths, strict=True))]).rstrip()]
    lines.append("  ".join(["-" * label_w, *("-" * w for w in widths)]))
    if zero_shot is not None:
        cells = [(f"{v:.2f}" if v is not None else "").rjust(w) for v, w in zip(zero_shot, widths, strict=False)]
        lines.append("  ".join(["zero-shot".ljust(label_w), *cells]).rstrip())
    for i, row in enumerate(matrix.rows):
        cells = [f"{row[j]:.2f}".rjust(w) if j <= i else " " * w for j, w in enumerate(widths)]
        lines.append("  ".join([row_labels[i].ljust(label_w), *cells]).rstrip())
    if n == 0:
        lines.append("(no tasks trained yet)")
        return "\n".join(lines)
    lines.append("")
    metrics = matrix.metrics()
    labels = {
        "avg_acc": "average accuracy",
        "avg_incremental_acc": "average incremental accuracy",
        "bwt": "backward transfer (BWT)",
        "forgetting": "forgetting",
    }
    name_w = max(map(len, labels.values()))
    for key, label in labels.items():
        lines.append(f"{label.ljust(name_w)}  {metrics[key]:7.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def save_plots(
    matrix: AccuracyMatrix, directory: str | os.PathLike[str], task_names: Sequence[str] | None = None
) -> list[Path]:
    """Write ``accuracy_matrix.png`` (annotated heatmap) and ``accuracy_curve.png`` into ``directory``.

    The curve shows ``A_i`` after each task (bold) and each task's accuracy over
    time (thin lines). Uses matplotlib's Agg backend, imported lazily; files are
    written atomically. Returns the two paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    n = _require_rows(matrix.rows)
    names = _names(task_names, n)
    out_dir = Path(directory)

    grid = np.full((n, n), np.nan)
    for i, row in enumerate(matrix.rows):
        grid[i, : i + 1] = row
    masked = np.ma.masked_invalid(grid)

    # Heatmap, masked above the diagonal.
    side = 1.6 + 0.7 * n
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=100.0)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    font = max(5.0, min(10.0, 60.0 / n))
    for i in range(n):
        for j in range(i + 1):
            value = grid[i, j]
            ax.text(
                j, i, f"{value:.1f}", ha="center", va="center", fontsize=font, color="black" if value > 60 else "white"
            )
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), [f"after {name}" for name in names])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("trained up to")
    ax.set_title("accuracy matrix")
    matrix_path = out_dir / "accuracy_matrix.png"
    atomic_write(matrix_path, lambda f: fig.savefig(f, format="png", dpi=120))

    # Average accuracy after each task, plus each task's accuracy over time.
    fig = Figure(figsize=(max(5.0, 1.0 + 0.5 * n), 4.0), layout="constrained")
    ax = fig.add_subplot()
    steps = np.arange(n)
    for j in range(n):
        label = names[j] if n <= 10 else None  # a legend entry per task only while it stays readable
        ax.plot(steps[j:], grid[j:, j], linewidth=0.9, alpha=0.7, marker=".", markersize=4, label=label)
    ax.plot(steps, matrix.average_accuracies, color="black", linewidth=2.2, marker="o", label="average accuracy")
    ax.set_xticks(steps, names, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_xlabel("after training task")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0.0, 100.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize="small", ncol=2 if n > 5 else 1)
    ax.set_title("accuracy over tasks (thin: each task)")
    curve_path = out_dir / "accuracy_curve.png"
    atomic_write(curve_path, lambda f: fig.savefig(f, format="png", dpi=120))
    return [matrix_path, curve_path]


# --------------------------------------------------------------------------- a run's scores


class Scores(Protocol):
    """How a run keeps its evaluation rows (a method chooses: `Method.new_scores`). `keys` name the scores, the
    first is the primary one; each stage's evaluation gives one row per key."""

    def add(self, rows: Sequence[Sequence[float]]) -> None:
        """Record a stage's evaluation: one row per key."""

    def state(self) -> dict[str, Any]:
        """JSON for a checkpoint."""

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `state` returned."""

    def to_dict(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """metrics.json's content (`save_metrics`)."""

    def text(self, task_names: Sequence[str], zero_shot: Sequence[float | None] | None) -> str:
        """What the run prints after each stage."""

    def log_values(self) -> dict[str, float]:
        """Scalars for the monitor (`cl/...`)."""

    def plot(self, directory: Path, task_names: Sequence[str]) -> list[Path]:
        """Write the plots; returns their paths, the primary matrix's first (none: empty)."""

    def primary_rows(self) -> list[list[float]]:
        """The primary score's rows: one per stage."""


class MatrixScores:
    """A task sequence's scores: one AccuracyMatrix per key, grown one row per trained task."""

    def __init__(self, keys: Sequence[str], num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.matrices = {key: AccuracyMatrix(num_tasks=num_tasks) for key in keys}

    @property
    def primary(self) -> AccuracyMatrix:
        return next(iter(self.matrices.values()))

    def add(self, rows: Sequence[Sequence[float]]) -> None:
        for matrix, row in zip(self.matrices.values(), rows, strict=True):
            matrix.add_row(row)

    def state(self) -> dict[str, Any]:
        return {"matrices": {key: m.rows for key, m in self.matrices.items()}, "joint": {}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.matrices = {k: AccuracyMatrix(rows, num_tasks=self.num_tasks) for k, rows in state["matrices"].items()}

    def to_dict(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        others = list(self.matrices)[1:]
        return self.primary.to_dict({**(extra or {}), **{key: self.matrices[key] for key in others}})

    def text(self, task_names: Sequence[str], zero_shot: Sequence[float | None] | None) -> str:
        lines = [format_table(self.primary, task_names, zero_shot=zero_shot)]
        for key, m in list(self.matrices.items())[1:]:
            lines.append(f"{key.removesuffix('_matrix').replace('_', ' ')}: average {m.avg_acc:.2f}, BWT {m.bwt:.2f}")
        return "\n".join(lines)

    def log_values(self) -> dict[str, float]:
        values = {f"cl/{k}": v for k, v in self.primary.metrics().items()}
        for key, m in list(self.matrices.items())[1:]:
            values[f"cl/{key.removesuffix('_accuracy_matrix')}_avg_acc"] = m.avg_acc
        return values

    def plot(self, directory: Path, task_names: Sequence[str]) -> list[Path]:
        return save_plots(self.primary, directory, task_names)

    def primary_rows(self) -> list[list[float]]:
        return self.primary.rows


class JointScores:
    """The scores of every task trained at once (method joint): one row per key and no sequence, so backward
    transfer and forgetting are 0 and every average is the row's mean. Stored as `joint_<key>` rows."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.rows: dict[str, list[float]] = {}

    def add(self, rows: Sequence[Sequence[float]]) -> None:
        self.rows = {key: list(row) for key, row in zip(self.keys, rows, strict=True)}

    def state(self) -> dict[str, Any]:
        return {"matrices": {}, "joint": self.rows}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.rows = dict(state["joint"])

    def _average(self) -> float:
        scores = self.rows[self.keys[0]]
        return sum(scores) / len(scores)

    def to_dict(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        avg = self._average()
        out: dict[str, Any] = {"avg_acc": avg, "avg_incremental_acc": avg, "bwt": 0.0, "forgetting": 0.0, "ap": avg,
                               "ft": 0.0}  # fmt: skip
        out.update({f"joint_{key.removesuffix('_matrix')}": row for key, row in self.rows.items()})
        out.update(extra or {})
        return out

    def text(self, task_names: Sequence[str], zero_shot: Sequence[float | None] | None) -> str:
        scores = self.rows[self.keys[0]]
        per_task = ", ".join(f"{n} {a:.2f}" for n, a in zip(task_names, scores, strict=True))
        return f"joint training, score per task: {per_task}\naverage {self._average():.2f}"

    def log_values(self) -> dict[str, float]:
        return {"cl/avg_acc": self._average()}

    def plot(self, directory: Path, task_names: Sequence[str]) -> list[Path]:
        return []

    def primary_rows(self) -> list[list[float]]:
        return [self.rows[self.keys[0]]] if self.rows else []


# --------------------------------------------------------------------------- over runs (seeds)

#: What `summarize` reports: the paper's two numbers first, then the matrix metrics.
SUMMARY_KEYS = ("pooled_final", "pooled_avg", "avg_acc", "avg_incremental_acc", "bwt", "forgetting")
METRICS_NAME = "metrics.json"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metrics_file(run: str | os.PathLike[str]) -> Path:
    path = Path(run)
    return path if path.is_file() else path / METRICS_NAME


def summarize_runs(runs: Sequence[str | os.PathLike[str]], keys: Sequence[str] = SUMMARY_KEYS) -> dict[str, Any]:
    """The mean and sample standard deviation (``n - 1``; None with one run) over ``runs`` of each key of
    their metrics.json (a run is its output_dir, or the metrics.json itself).

    Returns ``{"runs": [...], "metrics": {key: {"mean", "std", "n", "values"}}, "skipped": {key: [runs
    without it]}, "notes": [...]}``. A key that some run lacks (an older metrics.json, a method without
    it) is skipped, not averaged over fewer runs. Notes name runs still in progress (fewer rows than
    ``num_tasks``) and runs of other task sequences or methods than the first run's.

    Raises:
        FileNotFoundError: runs without a metrics.json, all named.
        ValueError: no runs, or a metrics.json that is not a JSON object.
    """
    if not runs:
        raise ValueError("no runs to summarize: give one or more run directories (their output_dir)")
    files = [_metrics_file(r) for r in runs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"no {METRICS_NAME} in {len(missing)} of {len(files)} runs: {', '.join(missing)} (not a run's "
            "output_dir, or a run that has not finished its first task)"
        )
    data: list[dict[str, Any]] = []
    for f in files:
        try:
            loaded = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{f}: not valid JSON ({err})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{f}: expected a JSON object of metrics, got {type(loaded).__name__}")
        data.append(loaded)
    names = [str(r) for r in runs]
    notes: list[str] = []
    for name, d in zip(names, data, strict=True):
        rows, total = len(d.get(MATRIX_KEY) or []), d.get("num_tasks")
        if total is not None and rows < total:
            notes.append(f"{name} is in progress: {rows} of {total} tasks scored")
        for what in ("method", "task_names"):
            if what in data[0] and what in d and d[what] != data[0][what]:
                notes.append(f"{name} has another {what} than {names[0]}: {d[what]!r}, not {data[0][what]!r}")
    metrics: dict[str, dict[str, Any]] = {}
    skipped: dict[str, list[str]] = {}
    for key in keys:
        lacking = [n for n, d in zip(names, data, strict=True) if not _is_number(d.get(key))]
        if lacking:
            skipped[key] = lacking
            continue
        values = [float(d[key]) for d in data]
        metrics[key] = {
            "mean": math.fsum(values) / len(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
            "values": values,
        }
    return {"runs": names, "metrics": metrics, "skipped": skipped, "notes": notes}


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line per key: ``key  mean ± std  (n runs: values)``."""
    width = max((len(k) for k in summary["metrics"]), default=0)
    lines = []
    for key, m in summary["metrics"].items():
        std = f"{m['std']:.2f}" if m["std"] is not None else "n/a"
        values = " ".join(f"{v:.2f}" for v in m["values"])
        lines.append(f"{key.ljust(width)}  {m['mean']:7.2f} ± {std}  ({m['n']} runs: {values})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inflora_dist.metrics", description="Metrics of finished runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    summarize = commands.add_parser(
        "summarize",
        help="mean and standard deviation over runs (e.g. seeds 0-4) of the paper's pooled accuracy and the "
        "matrix metrics",
        description="The mean and sample standard deviation over RUN_DIRs (each a run's output_dir, or its "
        f"metrics.json) of {', '.join(SUMMARY_KEYS)}: one line per key; a key that a run lacks is skipped "
        "with a note (stderr).",
    )
    summarize.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (or its metrics.json)")
    summarize.add_argument("--json", action="store_true", help="also print the summary as one JSON line, last")
    args = parser.parse_args(argv)
    summary = summarize_runs(args.runs)
    for key, lacking in summary["skipped"].items():
        print(f"note: {key} skipped: not in the metrics.json of {', '.join(lacking)}", file=sys.stderr)
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    text = format_summary(summary)
    if text:
        print(text)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_command(main)
