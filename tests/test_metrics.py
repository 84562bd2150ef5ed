"""Continual-learning metrics: hand-computed values, validation, JSON round trip, table, plots."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from inflora_dist.metrics import (
    AccuracyMatrix,
    JointScores,
    MatrixScores,
    average_accuracies,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    format_table,
    main,
    pooled_accuracies,
    pooled_metrics,
    save_metrics,
    save_plots,
    summarize_runs,
)

# R[i][j]: accuracy on task j after training task i.
ROWS = [
    [90.0],
    [95.0, 70.0],
    [60.0, 65.0, 50.0],
]
# By hand:
#   A_0 = 90, A_1 = (95 + 70) / 2 = 82.5, A_2 = (60 + 65 + 50) / 3 = 175 / 3
#   avg_incremental_acc = (90 + 82.5 + 175/3) / 3 = 692.5 / 9
#   bwt = ((60 - 90) + (65 - 70)) / 2 = -17.5
#   forgetting: task 0: max(90, 95) - 60 = 35; task 1: 70 - 65 = 5 -> (35 + 5) / 2 = 20
A = [90.0, 82.5, 175.0 / 3.0]
AVG_ACC = 175.0 / 3.0
AVG_INC = 692.5 / 9.0
BWT = -17.5
FORGETTING = 20.0

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_hand_computed_3x3() -> None:
    m = AccuracyMatrix(ROWS)
    assert m.average_accuracies == pytest.approx(A)
    assert m.avg_acc == pytest.approx(AVG_ACC)
    assert m.avg_incremental_acc == pytest.approx(AVG_INC)
    assert m.bwt == pytest.approx(BWT)
    assert m.forgetting == pytest.approx(FORGETTING)
    # The pure functions agree with the class.
    assert average_accuracies(ROWS) == pytest.approx(A)
    assert average_accuracy(ROWS) == pytest.approx(AVG_ACC)
    assert average_incremental_accuracy(ROWS) == pytest.approx(AVG_INC)
    assert backward_transfer(ROWS) == pytest.approx(BWT)
    assert forgetting(ROWS) == pytest.approx(FORGETTING)


def test_in_progress_two_rows_improvement_gives_negative_forgetting() -> None:
    # After task 1 of 3: task 0 went from 90 to 95.
    m = AccuracyMatrix(ROWS[:2], num_tasks=3)
    assert m.avg_acc == pytest.approx(82.5)
    assert m.avg_incremental_acc == pytest.approx((90.0 + 82.5) / 2)
    assert m.bwt == pytest.approx(5.0)
    assert m.forgetting == pytest.approx(-5.0)  # max over l in [0, 0] of R[l][0] = 90; 90 - 95


def test_forgetting_uses_best_earlier_accuracy_not_first() -> None:
    rows = [[50.0], [80.0, 90.0], [70.0, 90.0, 40.0], [40.0, 60.0, 40.0, 100.0]]
    m = AccuracyMatrix(rows)
    # task 0: max(50, 80, 70) - 40 = 40; task 1: max(90, 90) - 60 = 30; task 2: 40 - 40 = 0
    assert m.forgetting == pytest.approx(70.0 / 3)
    # bwt: (40 - 50) + (60 - 90) + (40 - 40) = -40
    assert m.bwt == pytest.approx(-40.0 / 3)
    assert m.avg_acc == pytest.approx(60.0)


def test_single_row() -> None:
    m = AccuracyMatrix()
    m.add_row([73.5])
    assert m.avg_acc == 73.5
    assert m.avg_incremental_acc == 73.5
    assert m.bwt == 0.0
    assert m.forgetting == 0.0


def test_empty_matrix() -> None:
    m = AccuracyMatrix(num_tasks=4)
    with pytest.raises(ValueError, match="no rows"):
        _ = m.avg_acc
    d = m.to_dict()
    assert d["accuracy_matrix"] == [] and d["avg_acc"] is None and d["num_tasks"] == 4
    assert "no tasks trained yet" in format_table(m)


@pytest.mark.parametrize("row, given", [([], 0), ([80.0], 1), ([80.0, 70.0, 60.0], 3)])
def test_row_length_validation_names_expected_and_given(row: list[float], given: int) -> None:
    m = AccuracyMatrix([[90.0]])
    with pytest.raises(ValueError, match=rf"must have 2 accuracies.*got {given}"):
        m.add_row(row)
    assert len(m) == 1  # unchanged


def test_first_row_must_have_one_value() -> None:
    with pytest.raises(ValueError, match=r"must have 1 accuracies.*got 2"):
        AccuracyMatrix([[90.0, 80.0]])


@pytest.mark.parametrize("bad", [-0.1, 100.5, float("nan"), float("inf"), "x", None])
def test_value_validation(bad: object) -> None:
    m = AccuracyMatrix([[90.0]])
    with pytest.raises(ValueError, match=r"R\[1\]\[1\]"):
        m.add_row([80.0, bad])  # type: ignore[list-item]
    assert len(m) == 1


def test_bounds_are_inclusive_and_num_tasks_caps_rows() -> None:
    m = AccuracyMatrix([[0.0], [100.0, 0.0]], num_tasks=2)
    with pytest.raises(ValueError, match="all 2 rows"):
        m.add_row([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="num_tasks"):
        AccuracyMatrix(num_tasks=0)


def test_to_dict_shape_and_extras() -> None:
    m = AccuracyMatrix(ROWS)
    til = AccuracyMatrix([[99.0], [98.0, 97.0], [96.0, 95.0, 94.0]])
    d = m.to_dict({"task_names": ["a", "b", "c"], "task_incremental_accuracy_matrix": til})
    assert d["accuracy_matrix"] == ROWS
    assert [len(r) for r in d["accuracy_matrix"]] == [1, 2, 3]
    assert d["bwt"] == pytest.approx(BWT)
    assert d["task_names"] == ["a", "b", "c"]
    assert d["task_incremental_accuracy_matrix"] == til.rows
    with pytest.raises(ValueError, match="overwrite"):
        m.to_dict({"bwt": 0.0})


def test_json_round_trip(tmp_path) -> None:
    m = AccuracyMatrix(ROWS, num_tasks=5)
    til = AccuracyMatrix([[99.0], [98.0, 97.0], [96.0, 95.0, 94.0]])
    path = save_metrics(tmp_path / "sub" / "metrics.json", m, extra={"task_incremental_accuracy_matrix": til})
    assert path == tmp_path / "sub" / "metrics.json"
    assert os.listdir(tmp_path / "sub") == ["metrics.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["avg_acc"] == pytest.approx(AVG_ACC)
    assert data["avg_incremental_acc"] == pytest.approx(AVG_INC)
    assert data["bwt"] == pytest.approx(BWT)
    assert data["forgetting"] == pytest.approx(FORGETTING)
    back = AccuracyMatrix.from_dict(data)
    assert back == m
    assert back.rows == ROWS and back.num_tasks == 5
    assert AccuracyMatrix.from_dict(data, key="task_incremental_accuracy_matrix").rows == til.rows
    # Overwriting replaces the file.
    m.add_row([50.0, 50.0, 50.0, 50.0])
    save_metrics(path, m)
    assert len(json.loads(path.read_text())["accuracy_matrix"]) == 4
    assert os.listdir(tmp_path / "sub") == ["metrics.json"]


def test_from_dict_revalidates() -> None:
    with pytest.raises(ValueError, match="must have 2"):
        AccuracyMatrix.from_dict({"accuracy_matrix": [[1.0], [1.0]]})
    with pytest.raises(KeyError, match="accuracy_matrix"):
        AccuracyMatrix.from_dict({})


def test_format_table() -> None:
    m = AccuracyMatrix(ROWS, num_tasks=4)
    text = format_table(m, task_names=["cifar", "cub", "dogs", "cars"])
    lines = text.splitlines()
    for value in ("90.00", "95.00", "70.00", "60.00", "65.00", "50.00"):
        assert value in text
    assert "cars" in lines[0]  # all num_tasks columns in the header
    assert lines[2].startswith("after cifar") and lines[2].rstrip().endswith("90.00")  # blanks above the diagonal
    assert lines[3].split()[-2:] == ["95.00", "70.00"]
    # Fixed width: cell columns line up across rows.
    assert lines[2].index("90.00") == lines[3].index("95.00") == lines[4].index("60.00")
    assert lines[3].index("70.00") == lines[4].index("65.00")
    assert f"{AVG_ACC:.2f}" in text  # 58.33
    assert f"{AVG_INC:.2f}" in text  # 76.94
    assert "-17.50" in text
    assert "20.00" in text
    default = format_table(m)
    assert "after task 2" in default and "task 3" in default
    with pytest.raises(ValueError, match="task_names"):
        format_table(m, task_names=["a", "b"])


def test_format_table_shows_the_zero_shot_row_first() -> None:
    m = AccuracyMatrix(ROWS, num_tasks=4)
    lines = format_table(m, task_names=["cifar", "cub", "dogs", "cars"], zero_shot=[12.5, 3.0, 7.25, None]).splitlines()
    assert lines[2].split() == ["zero-shot", "12.50", "3.00", "7.25"]  # a task an extension added has none
    assert lines[3].startswith("after cifar") and lines[2].index("12.50") == lines[3].index("90.00")


def test_save_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    m = AccuracyMatrix(ROWS, num_tasks=10)
    paths = save_plots(m, tmp_path / "plots", task_names=["a", "b", "c"])
    assert [p.name for p in paths] == ["accuracy_matrix.png", "accuracy_curve.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 5_000
    assert sorted(os.listdir(tmp_path / "plots")) == ["accuracy_curve.png", "accuracy_matrix.png"]
    # A single row plots too.
    one = save_plots(AccuracyMatrix([[42.0]]), tmp_path / "one")
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in one)


def _gainlora_cl_and_fgt(rows: list[list[float]]) -> tuple[float, float]:
    """AP ("Cl") and FT ("Fgt") as GainLoRA's score.py computes them, on its zero-padded square matrix."""
    n = len(rows)
    square = [list(r) + [0.0] * (n - len(r)) for r in rows]
    cl = sum(square[-1]) / n
    fgt = [max(line[j] for line in square[:-1]) - square[-1][j] for j in range(n - 1)]
    return cl, sum(fgt) / len(fgt)


def test_ap_and_ft_are_gainloras_definitions() -> None:
    rng = random.Random(0)
    for n in (2, 3, 6):
        rows = [[rng.uniform(0, 100) for _ in range(i + 1)] for i in range(n)]
        rows[-1][0] = 0.0  # a task forgotten entirely
        data = AccuracyMatrix(rows).to_dict()
        cl, fgt = _gainlora_cl_and_fgt(rows)
        assert data["ap"] == pytest.approx(cl, abs=1e-12) and data["ap"] == data["avg_acc"]
        assert data["ft"] == pytest.approx(fgt, abs=1e-12) and data["ft"] == data["forgetting"]


# --------------------------------------------------------------------------- pooled accuracy (the paper's)

# A hand count: tasks of 10, 30 and 20 eval samples; correct answers after each task:
#   after task 0: task 0  9/10                      -> pooled  9/10            = 90.0
#   after task 1: task 0  8/10, task 1 21/30         -> pooled (8+21)/40        = 72.5
#   after task 2: task 0  6/10, task 1 15/30, task 2 15/20 -> (6+15+15)/60      = 60.0
EVAL_COUNTS = [10, 30, 20]
CORRECT = [[9], [8, 21], [6, 15, 15]]
COUNTED_ROWS = [[100.0 * c / n for c, n in zip(row, EVAL_COUNTS, strict=False)] for row in CORRECT]


def test_pooled_accuracy_is_the_hand_count_not_the_task_mean() -> None:
    assert COUNTED_ROWS == [[90.0], [80.0, 70.0], [60.0, 50.0, 75.0]]
    pooled = pooled_accuracies(COUNTED_ROWS, EVAL_COUNTS)
    assert pooled == pytest.approx([90.0, 72.5, 60.0])
    assert pooled[-1] != pytest.approx(average_accuracy(COUNTED_ROWS))  # 60.0 pooled, 61.67 by task: unbalanced
    assert pooled_metrics(COUNTED_ROWS, EVAL_COUNTS) == {
        "pooled_acc": pytest.approx([90.0, 72.5, 60.0]),
        "pooled_final": pytest.approx(60.0),
        "pooled_avg": pytest.approx((90.0 + 72.5 + 60.0) / 3),
    }
    # Balanced tasks: pooled is the per-task mean.
    assert pooled_accuracies(ROWS, [7, 7, 7]) == pytest.approx(A)


def test_pooled_accuracy_of_a_joint_run_pools_all_tasks() -> None:
    scores = JointScores(["accuracy_matrix"])
    scores.add([COUNTED_ROWS[-1]])
    assert pooled_metrics(scores.primary_rows(), EVAL_COUNTS) == {
        "pooled_acc": pytest.approx([60.0]),
        "pooled_final": pytest.approx(60.0),
        "pooled_avg": pytest.approx(60.0),
    }
    # A sequence's scores: one pooled value per trained task, and the counts may cover tasks still to come.
    seq = MatrixScores(["accuracy_matrix"], num_tasks=4)
    for row in COUNTED_ROWS[:2]:
        seq.add([row])
    assert pooled_accuracies(seq.primary_rows(), [*EVAL_COUNTS, 5]) == pytest.approx([90.0, 72.5])


def test_pooled_accuracy_validation() -> None:
    with pytest.raises(ValueError, match="row 2 scores 3 tasks but eval_counts has 2"):
        pooled_accuracies(COUNTED_ROWS, [10, 30])
    with pytest.raises(ValueError, match=r"eval_counts\[1\]"):
        pooled_accuracies(COUNTED_ROWS, [10, -1, 20])
    with pytest.raises(ValueError, match="no eval samples"):
        pooled_accuracies([[0.0]], [0, 5])
    with pytest.raises(ValueError, match="no rows"):
        pooled_metrics([], EVAL_COUNTS)


# --------------------------------------------------------------------------- summarize over seeds


def _run(root: Path, name: str, **values: object) -> Path:
    run = root / name
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"num_tasks": 2, "accuracy_matrix": [[90.0], [80.0, 70.0]],
                                                  **values}))  # fmt: skip
    return run


SEEDS = {
    "seed0": {"pooled_final": 75.0, "pooled_avg": 80.0, "avg_acc": 74.0, "avg_incremental_acc": 79.0, "bwt": -2.0,
              "forgetting": 3.0},
    "seed1": {"pooled_final": 76.0, "pooled_avg": 81.5, "avg_acc": 75.0, "avg_incremental_acc": 80.0, "bwt": -1.0,
              "forgetting": 2.0},
    "seed2": {"pooled_final": 77.5, "pooled_avg": 80.5, "avg_acc": 76.0, "avg_incremental_acc": 81.0, "bwt": -3.0,
              "forgetting": 4.0},
}  # fmt: skip


def test_summarize_prints_mean_and_sample_std_per_key(tmp_path, capsys) -> None:
    runs = [str(_run(tmp_path, name, **values)) for name, values in SEEDS.items()]
    assert main(["summarize", *runs, "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(lines[-1])
    keys = ["pooled_final", "pooled_avg", "avg_acc", "avg_incremental_acc", "bwt", "forgetting"]
    assert list(summary["metrics"]) == keys and summary["runs"] == runs
    assert [line.split()[0] for line in lines[:-1]] == keys  # one line per key, the paper's first
    # By hand: pooled_final 75, 76, 77.5 -> mean 76.1667; deviations -1.1667, -0.1667, 1.3333;
    # squares 1.3611 + 0.0278 + 1.7778 = 3.1667, / (3 - 1) = 1.5833, sqrt -> 1.2583
    final = summary["metrics"]["pooled_final"]
    assert final["mean"] == pytest.approx(228.5 / 3) and final["std"] == pytest.approx(1.2583, abs=1e-4)
    assert final["n"] == 3 and final["values"] == [75.0, 76.0, 77.5]
    for key in keys:
        values = [SEEDS[name][key] for name in SEEDS]
        got = summary["metrics"][key]
        assert got["mean"] == pytest.approx(statistics.mean(values))
        assert got["std"] == pytest.approx(statistics.stdev(values))
    assert lines[0].split()[1:4] == ["76.17", "±", "1.26"]
    assert summary["skipped"] == {} and summary["notes"] == []


def test_summarize_skips_a_key_a_run_lacks_and_notes_it(tmp_path, capsys) -> None:
    old = {k: v for k, v in SEEDS["seed1"].items() if not k.startswith("pooled")}  # written before pooled_*
    runs = [_run(tmp_path, "seed0", **SEEDS["seed0"]), _run(tmp_path, "seed1", **old)]
    assert main(["summarize", *map(str, runs)]) == 0
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.out.splitlines()] == ["avg_acc", "avg_incremental_acc", "bwt",
                                                                       "forgetting"]  # fmt: skip
    assert f"note: pooled_final skipped: not in the metrics.json of {runs[1]}" in captured.err
    one = summarize_runs([runs[0] / "metrics.json"])  # a metrics.json itself; one run: no deviation
    assert one["metrics"]["pooled_final"] == {"mean": 75.0, "std": None, "n": 1, "values": [75.0]}
    # A run still in progress, or of another sequence, is noted.
    (runs[1] / "metrics.json").write_text(json.dumps({**old, "num_tasks": 3, "accuracy_matrix": [[1.0]],
                                                      "task_names": ["x"]}))  # fmt: skip
    notes = summarize_runs(runs)["notes"]
    assert notes == [f"{runs[1]} is in progress: 1 of 3 tasks scored"]


def test_summarize_names_runs_without_metrics(tmp_path) -> None:
    good = _run(tmp_path, "seed0", **SEEDS["seed0"])
    (tmp_path / "seed1").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metrics.json in 2 of 3 runs: .*seed1/metrics.json, .*seed2"):
        summarize_runs([good, tmp_path / "seed1", tmp_path / "seed2"])
    (tmp_path / "seed1" / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"seed1/metrics\.json: expected a JSON object"):
        summarize_runs([good, tmp_path / "seed1"])
    # The command prints that as one line and exits 2 (inflora_dist.errors.run_command).
    command = [sys.executable, "-m", "inflora_dist.metrics", "summarize", str(good), str(tmp_path / "gone")]
    proc = subprocess.run(command, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().endswith("(not a run's output_dir, or a run that has not finished its first task)")
    assert f"error: FileNotFoundError: no metrics.json in 1 of 2 runs: {tmp_path / 'gone'}" in proc.stderr
