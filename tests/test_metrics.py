"""Continual-learning metrics: hand-computed values, validation, JSON round trip, table, plots."""

from __future__ import annotations

import json
import os
import random

import pytest

from inflora_dist.metrics import (
    AccuracyMatrix,
    average_accuracies,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    format_table,
    save_metrics,
    save_plots,
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
