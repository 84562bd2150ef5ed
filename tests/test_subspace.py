"""Tests of `inflora_dist.subspace`: the DualGPM memory and the design of A (CPU only, seeded).

The central test compares `SubspaceMemory` with an independent float64 numpy
port of the reference implementation (liangyanshuo/InfLoRA, methods/inflora.py:
`InfLoRA.update_DualGPM` and the design of A in `InfLoRA._train`), task by task.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import inflora_dist  # noqa: F401
except ImportError:  # the package is not installed: import it from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inflora_dist.bench.scale import svd_projected
from inflora_dist.subspace import (
    A_SCALE,
    REMOVE,
    RETAIN,
    SubspaceMemory,
    batched_eigh,
    complement_basis,
    energy_threshold,
    principal_angle,
    row_space,
    stacked_eigh,
)

LOGGER_NAME = "inflora_dist.subspace"


# ---------------------------------------------------------------------------
# Oracle: a straight float64 numpy port of the reference repository
# ---------------------------------------------------------------------------
class RefDualGPM:
    """One layer of `InfLoRA.update_DualGPM` / `InfLoRA._train` (reference), in float64 numpy.

    `fix_first_retain=True` stores the free-space basis U[:, r:] when the first
    task already keeps r >= d/2 directions; False reproduces the reference bug
    (it stores U[:, :r] and labels it 'retain').
    """

    def __init__(self, lamb: float, lame: float, total_sessions: int, fix_first_retain: bool = True):
        self.lamb = lamb
        self.lame = lame
        self.total_sessions = total_sessions
        self.fix_first_retain = fix_first_retain
        self.feature: np.ndarray | None = None  # feature_list[i]
        self.project_type: str | None = None  # project_type[i]
        self.pre_summary: tuple[np.ndarray, str] | None = None  # state before the summary step

    def threshold(self, task: int) -> float:
        return (self.lame - self.lamb) * task / self.total_sessions + self.lamb

    def feature_mat(self) -> np.ndarray:
        return self.feature @ self.feature.T

    def protected_projector(self, d: int) -> np.ndarray:
        """Projector onto the old tasks' subspace (remove: M M^T; retain: I - Q Q^T)."""
        if self.feature is None:
            return np.zeros((d, d))
        if self.project_type == "remove":
            return self.feature_mat()
        return np.eye(d) - self.feature_mat()

    def design_a(self, cur_matrix: np.ndarray, rank: int) -> np.ndarray:
        """The A written into lora_A_k / lora_A_v before training a task."""
        if self.feature is None:
            u, _, _ = np.linalg.svd(cur_matrix)
        else:
            if self.project_type == "remove":
                cur_matrix = cur_matrix - self.feature_mat() @ cur_matrix
            else:
                assert self.project_type == "retain"
                cur_matrix = self.feature_mat() @ cur_matrix
            u, _, _ = np.linalg.svd(cur_matrix, full_matrices=False)
        return u[:, :rank].T / math.sqrt(3)

    def update(self, activation: np.ndarray, task: int) -> None:
        threshold = self.threshold(task)
        d = activation.shape[0]
        if self.feature is None:
            u, s, _ = np.linalg.svd(activation, full_matrices=False)
            sval_total = (s**2).sum()
            sval_ratio = (s**2) / sval_total
            r = np.sum(np.cumsum(sval_ratio) < threshold)
            if r < d / 2:
                self.feature = u[:, 0 : max(r, 1)]
                self.project_type = "remove"
            else:
                self.feature = u[:, r:] if self.fix_first_retain else u[:, 0 : max(r, 1)]
                self.project_type = "retain"
        elif self.project_type == "remove":
            _u1, s1, _ = np.linalg.svd(activation, full_matrices=False)
            sval_total = (s1**2).sum()
            act_hat = activation - self.feature_mat() @ activation
            u, s, _ = np.linalg.svd(act_hat, full_matrices=False)
            sval_hat = (s**2).sum()
            sval_ratio = (s**2) / sval_total
            accumulated_sval = (sval_total - sval_hat) / sval_total
            r = 0
            for ii in range(sval_ratio.shape[0]):
                if accumulated_sval < threshold:
                    accumulated_sval += sval_ratio[ii]
                    r += 1
                else:
                    break
            if r > 0:
                ui = np.hstack((self.feature, u[:, 0:r]))
                self.feature = ui[:, 0 : ui.shape[0]] if ui.shape[1] > ui.shape[0] else ui
        else:
            assert self.project_type == "retain"
            _u1, s1, _ = np.linalg.svd(activation, full_matrices=False)
            sval_total = (s1**2).sum()
            act_hat = self.feature_mat() @ activation
            u, s, _ = np.linalg.svd(act_hat, full_matrices=False)
            sval_hat = (s**2).sum()
            sval_ratio = (s**2) / sval_total
            accumulated_sval = sval_hat / sval_total
            r = 0
            for ii in range(sval_ratio.shape[0]):
                if accumulated_sval >= (1 - threshold):
                    accumulated_sval -= sval_ratio[ii]
                    r += 1
                else:
                    break
            if r > 0:
                act_feature = self.feature - u[:, 0:r] @ (u[:, 0:r].T @ self.feature)
                ui, _, _ = np.linalg.svd(act_feature)
                self.feature = ui[:, : self.feature.shape[1] - r]

        # Gradient Constraints Summary
        self.pre_summary = (self.feature.copy(), self.project_type)
        if self.project_type == "remove" and self.feature.shape[1] > self.feature.shape[0] / 2:
            uf, _, _ = np.linalg.svd(self.feature)
            self.feature = uf[:, self.feature.shape[1] :]
            self.project_type = "retain"
        elif self.project_type == "retain":
            assert self.feature.shape[1] <= self.feature.shape[0] / 2


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def make_cov(rng: np.random.Generator, d: int, spectrum: np.ndarray, n: int = 400) -> np.ndarray:
    """Uncentred covariance X^T X / N of N samples with the given (rotated) variance spectrum."""
    x = rng.standard_normal((n, d)) * np.sqrt(spectrum)
    x = x @ _rotation(rng, d).T
    return x.T @ x / n


def perturb(rng: np.random.Generator, cov: np.ndarray, scale: float = 0.05) -> np.ndarray:
    """A nearby covariance: the same task's features after training moved them a little."""
    d = cov.shape[0]
    x = rng.standard_normal((4 * d, d)) * math.sqrt(scale * np.trace(cov) / d)
    return cov + x.T @ x / (4 * d)


def proj(basis: torch.Tensor | np.ndarray) -> np.ndarray:
    b = np.asarray(basis, dtype=np.float64)
    return b @ b.T


def a_proj(a: torch.Tensor | np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.T @ a


def nonzero_rows(a: torch.Tensor) -> int:
    return int((a.abs().sum(dim=1) > 0).sum())


def t64(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def run_pair(
    d: int,
    lamb: float,
    lame: float,
    covs: list[tuple[np.ndarray, np.ndarray]],
    rank: int,
) -> list[dict]:
    """Drive ours and the oracle over the same tasks; compare after every task; return a trace."""
    num_tasks = len(covs)
    mem = SubspaceMemory(d, lamb, lame, num_tasks)
    ref = RefDualGPM(lamb, lame, num_tasks)
    trace = []
    for task, (pre, post) in enumerate(covs):
        # Design of A before training task `task`.
        a = mem.down_projection(t64(pre), rank)
        a_ref = ref.design_a(pre, rank)
        assert a.dtype == torch.float64 and a.shape == (rank, d)
        free_dim = d - mem.old_basis().shape[1]
        usable = nonzero_rows(a)
        assert usable == min(rank, free_dim), (task, usable, rank, free_dim)
        assert torch.all(a[usable:] == 0)
        np.testing.assert_allclose(a_proj(a), a_proj(a_ref[:usable]), atol=1e-8, rtol=0)
        # Every new A is orthogonal to the old tasks' subspace.
        if mem.mode is not None:
            assert (a @ mem.old_basis()).abs().max().item() < 1e-10

        # DualGPM update after training.
        mem.update(t64(post), task)
        ref.update(post, task)
        assert mem.mode == ref.project_type, (task, mem.mode, ref.project_type)
        assert mem.basis.shape == ref.feature.shape, (task, mem.basis.shape, ref.feature.shape)
        np.testing.assert_allclose(proj(mem.old_basis()), ref.protected_projector(d), atol=1e-8, rtol=0)
        # Stored basis is orthonormal and never larger than d/2 once summarised.
        b = mem.basis
        np.testing.assert_allclose(b.T @ b, np.eye(b.shape[1]), atol=1e-10, rtol=0)
        assert b.shape[1] <= d / 2
        assert b.is_contiguous()  # row-major: collectives send the raw memory
        trace.append({"mode": mem.mode, "stored": b.shape[1], "protected": mem.old_basis().shape[1]})
    return trace


def sequence(seed: int, d: int, num_tasks: int, spectra: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per task: (covariance seen when designing A, covariance after training)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_tasks):
        if spectra == "steep":  # low-rank-ish but full rank
            spec = np.geomspace(1.0, 1e-3, d) * rng.uniform(0.5, 2.0)
        elif spectra == "flat":
            spec = rng.uniform(0.7, 1.3, d)
        else:  # "mixed": a few strong directions over a flat floor
            spec = np.concatenate([rng.uniform(3.0, 6.0, 2), rng.uniform(0.1, 1.0, d - 2)])
        pre = make_cov(rng, d, spec)
        out.append((pre, perturb(rng, pre)))
    return out


# ---------------------------------------------------------------------------
# 1 + 2. Oracle comparison and orthogonality of A, in all three mode histories
# ---------------------------------------------------------------------------
ORACLE_CASES = {
    # name: (seed, d, tasks, lambda_begin, lambda_end, spectra, rank)
    "stays_remove": (11, 16, 5, 0.30, 0.45, "steep", 3),
    "stays_remove_b": (12, 24, 4, 0.20, 0.40, "steep", 4),
    "remove_to_retain": (21, 12, 6, 0.50, 0.90, "mixed", 3),
    "remove_to_retain_b": (22, 20, 5, 0.85, 0.99, "steep", 4),
    "retain_from_start": (31, 10, 5, 0.90, 0.99, "flat", 2),
    "retain_from_start_b": (32, 16, 4, 0.99, 0.995, "flat", 1),
    "mixed_8": (41, 8, 6, 0.60, 0.95, "mixed", 2),
}


@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_matches_reference_oracle(name):
    """Ours equals the (fixed) reference DualGPM after every task: protected projector, mode, A projector.

    Guards the whole DualGPM bookkeeping (first task, remove growth, retain
    growth, the remove->retain complement switch) and the design of A, and
    that every A is orthogonal to the protected subspace in both modes.
    """
    seed, d, tasks, lamb, lame, spectra, rank = ORACLE_CASES[name]
    trace = run_pair(d, lamb, lame, sequence(seed, d, tasks, spectra), rank)
    modes = [t["mode"] for t in trace]
    stored = [t["stored"] for t in trace]
    protected = [t["protected"] for t in trace]
    # The scenario each case exists for really happened (so the test cannot silently stop covering it).
    if name.startswith("stays_remove"):
        assert set(modes) == {REMOVE}, modes
        assert protected[-1] > protected[0], protected  # remove-mode growth happened
    elif name.startswith("remove_to_retain"):
        assert modes[0] == REMOVE and modes[-1] == RETAIN, modes
        switch = modes.index(RETAIN)
        assert switch >= 1
        assert any(b < a for a, b in itertools.pairwise(stored[switch:])), stored  # retain growth
    elif name.startswith("retain_from_start"):
        assert set(modes) == {RETAIN}, modes
        assert any(b < a for a, b in itertools.pairwise(stored)), stored  # retain-mode growth happened
    # Protected subspace never shrinks.
    assert protected == sorted(protected), protected


def test_oracle_suite_covers_all_scenarios():
    """The oracle cases together exercise remove-only, remove->retain and retain-from-task-0 histories."""
    seen = set()
    for seed, d, tasks, lamb, lame, spectra, rank in ORACLE_CASES.values():
        modes = tuple(t["mode"] for t in run_pair(d, lamb, lame, sequence(seed, d, tasks, spectra), rank))
        if set(modes) == {REMOVE}:
            seen.add("remove_only")
        elif modes[0] == REMOVE and RETAIN in modes:
            seen.add("switch")
        elif modes[0] == RETAIN:
            seen.add("retain_from_start")
    assert seen == {"remove_only", "switch", "retain_from_start"}


@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_match_oracle(seed):
    """Randomised task sequences (dims 8-24, 4-6 tasks, varied spectra and lambdas) match the oracle."""
    rng = np.random.default_rng(1000 + seed)
    d = int(rng.integers(8, 25))
    tasks = int(rng.integers(4, 7))
    lamb = float(rng.uniform(0.3, 0.9))
    lame = float(rng.uniform(lamb, 0.99))
    spectra = ["steep", "flat", "mixed"][seed % 3]
    rank = int(rng.integers(1, 4))
    run_pair(d, lamb, lame, sequence(seed, d, tasks, spectra), rank)


class SvdMemory(SubspaceMemory):
    """The memory with the projected decompositions of before the eigh path (`bench.scale.svd_projected`)."""

    def _projected_svd(self, c, eig=None):
        return super()._projected_svd(c) if self.mode is None else svd_projected(self, c)


@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_eigh_path_equals_the_svd_path(name):
    """The projected decompositions from eigh(B B^T) give the SVD path's k and subspaces (principal angle <= 1e-6)
    at every task, in every mode history: the A designs, the grown memories, the modes."""
    seed, d, tasks, lamb, lame, spectra, rank = ORACLE_CASES[name]
    ours, svd = SubspaceMemory(d, lamb, lame, tasks), SvdMemory(d, lamb, lame, tasks)
    for task, (pre, post) in enumerate(sequence(seed, d, tasks, spectra)):
        a, a_svd = ours.down_projection(t64(pre), rank), svd.down_projection(t64(pre), rank)
        assert nonzero_rows(a) == nonzero_rows(a_svd)
        assert principal_angle(row_space(a), row_space(a_svd)) <= 1e-6
        ours.update(t64(post), task)
        svd.update(t64(post), task)
        assert (ours.mode, ours.protected_dim) == (svd.mode, svd.protected_dim), task
        assert principal_angle(ours.basis, svd.basis) <= 1e-6


def test_principal_angle():
    """Known angles between planes of R^4; bases of different widths are refused."""
    e = torch.eye(4, dtype=torch.float64)
    tilted = torch.stack([e[0], math.cos(0.3) * e[1] + math.sin(0.3) * e[2]], dim=1)
    assert principal_angle(e[:, :2], e[:, :2]) == 0.0
    assert principal_angle(e[:, :2], tilted) == pytest.approx(0.3, abs=1e-12)
    assert principal_angle(e[:, :2], e[:, 2:]) == pytest.approx(math.pi / 2)
    with pytest.raises(ValueError, match="same shape"):
        principal_angle(e[:, :2], e[:, :3])


@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_new_a_orthogonal_to_old_basis(name):
    """At every task, in both modes, the freshly designed A has |A @ old_basis()| < 1e-10."""
    seed, d, tasks, lamb, lame, spectra, rank = ORACLE_CASES[name]
    covs = sequence(seed + 500, d, tasks, spectra)
    mem = SubspaceMemory(d, lamb, lame, tasks)
    modes = set()
    for task, (pre, post) in enumerate(covs):
        a = mem.down_projection(t64(pre), rank)
        if mem.mode is not None:
            modes.add(mem.mode)
            assert (a @ mem.old_basis()).abs().max().item() < 1e-10
            # A's rows lie in the free space: projecting out the old subspace leaves them unchanged.
            p = mem.old_basis()
            torch.testing.assert_close(a - (a @ p) @ p.T, a, atol=1e-10, rtol=0)
        mem.update(t64(post), task)
    assert modes  # at least one designed A was checked against a non-empty memory


def test_orthogonality_covers_both_modes():
    """The orthogonality cases above design A under a remove-mode memory and under a retain-mode one."""
    modes = set()
    for seed, d, tasks, lamb, lame, spectra, _rank in ORACLE_CASES.values():
        mem = SubspaceMemory(d, lamb, lame, tasks)
        for task, (_, post) in enumerate(sequence(seed + 500, d, tasks, spectra)[:-1]):
            mem.update(t64(post), task)
            modes.add(mem.mode)
    assert modes == {REMOVE, RETAIN}


# ---------------------------------------------------------------------------
# 3. The first-task retain fix
# ---------------------------------------------------------------------------
def test_first_task_retain_stores_free_space():
    """A first task keeping k >= d/2 directions protects exactly its top-k directions (reference bug fixed).

    The reference stores U[:, :k] labelled 'retain', so the next A is designed
    INSIDE the top-k directions of task 0; ours stores the free space U[:, k:].
    (With k > d/2 the reference then trips its own `<= d/2` assert, so the bug
    is silent exactly when k == d/2, the case built here.)
    """
    rng = np.random.default_rng(3)
    d, rank = 12, 3
    c0 = make_cov(rng, d, rng.uniform(0.8, 1.2, d))
    c1 = make_cov(rng, d, rng.uniform(0.8, 1.2, d))
    u, s, _ = np.linalg.svd(c0)
    ratio = np.cumsum(s**2) / np.sum(s**2)
    k = d // 2
    lam = float((ratio[k - 1] + ratio[k]) / 2)  # keeps exactly k = d/2 directions
    assert int(np.sum(ratio < lam)) == k
    top_k = u[:, :k]

    mem = SubspaceMemory(d, lam, lam, 3)
    mem.update(t64(c0), 0)
    assert mem.mode == RETAIN
    assert mem.basis.shape == (d, d - k)
    assert mem.old_basis().shape == (d, k)
    np.testing.assert_allclose(proj(mem.old_basis()), top_k @ top_k.T, atol=1e-10, rtol=0)

    fixed = RefDualGPM(lam, lam, 3, fix_first_retain=True)
    buggy = RefDualGPM(lam, lam, 3, fix_first_retain=False)
    fixed.update(c0, 0)
    buggy.update(c0, 0)
    assert buggy.project_type == fixed.project_type == "retain"
    np.testing.assert_allclose(proj(mem.old_basis()), fixed.protected_projector(d), atol=1e-10, rtol=0)

    a = mem.down_projection(t64(c1), rank)
    a_fixed = fixed.design_a(c1, rank)
    a_buggy = buggy.design_a(c1, rank)
    # Ours: orthogonal to task 0's top-k directions, and equal to the fixed reference.
    assert np.abs(a.numpy() @ top_k).max() < 1e-10
    np.testing.assert_allclose(a_proj(a), a_proj(a_fixed), atol=1e-8, rtol=0)
    # The buggy reference: A lies inside task 0's top-k directions (every row fully).
    np.testing.assert_allclose(np.linalg.norm(a_buggy @ top_k, axis=1), A_SCALE, atol=1e-8)
    assert np.abs(a_buggy @ top_k).max() > 0.1


def test_buggy_reference_asserts_when_first_task_keeps_more_than_half():
    """Documents the oracle: with k > d/2 the unfixed reference fails its own summary assert; ours is fine."""
    rng = np.random.default_rng(4)
    d = 12
    c0 = make_cov(rng, d, rng.uniform(0.8, 1.2, d))
    mem = SubspaceMemory(d, 0.9, 0.9, 2)
    mem.update(t64(c0), 0)
    assert mem.mode == RETAIN and mem.old_basis().shape[1] > d / 2
    fixed = RefDualGPM(0.9, 0.9, 2, fix_first_retain=True)
    fixed.update(c0, 0)
    np.testing.assert_allclose(proj(mem.old_basis()), fixed.protected_projector(d), atol=1e-10, rtol=0)
    with pytest.raises(AssertionError):
        RefDualGPM(0.9, 0.9, 2, fix_first_retain=False).update(c0, 0)


# ---------------------------------------------------------------------------
# 4. Rank is monotone in the threshold
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("spectra", ["steep", "flat", "mixed"])
def test_first_task_rank_monotone_in_lambda(spectra):
    """For a fixed covariance the number of protected directions after task 0 never decreases with lambda."""
    d = 14
    pre, _ = sequence(7, d, 1, spectra)[0]
    s = np.linalg.svd(pre, compute_uv=False)
    ratio = np.cumsum(s**2) / np.sum(s**2)
    ks = []
    for lam in np.linspace(0.02, 1.0, 50):
        mem = SubspaceMemory(d, float(lam), float(lam), 2)
        mem.update(t64(pre), 0)
        k = mem.old_basis().shape[1]
        assert k == max(int(np.sum(ratio < lam)), 1)  # Eq. 5, at least one direction
        ks.append(k)
    assert ks == sorted(ks), ks
    assert ks[0] == 1 and ks[-1] >= d - 1
    assert len(set(ks)) > 3


# ---------------------------------------------------------------------------
# 5. The remove -> retain switch preserves the span
# ---------------------------------------------------------------------------
def test_remove_to_retain_switch_preserves_span():
    """When growth takes k past d/2 the memory switches to the complement without changing the protected span."""
    rng = np.random.default_rng(5)
    d = 12
    c0 = make_cov(rng, d, np.geomspace(1.0, 1e-2, d))
    c1 = make_cov(rng, d, rng.uniform(0.8, 1.2, d))
    mem = SubspaceMemory(d, 0.5, 0.98, 2)
    ref = RefDualGPM(0.5, 0.98, 2)
    mem.update(t64(c0), 0)
    ref.update(c0, 0)
    assert mem.mode == REMOVE and mem.basis.shape[1] < d / 2
    before = mem.old_basis().clone()

    mem.update(t64(c1), 1)
    ref.update(c1, 1)
    pre_basis, pre_type = ref.pre_summary
    assert pre_type == "remove" and pre_basis.shape[1] > d / 2  # k crossed d/2 ...
    assert mem.mode == RETAIN  # ... and the memory switched to storing the free space
    k = pre_basis.shape[1]
    assert mem.basis.shape == (d, d - k)
    assert mem.old_basis().shape == (d, k)
    # Protected projector before the complement step (grown M) == after (I - Q Q^T).
    np.testing.assert_allclose(np.eye(d) - proj(mem.basis), proj(pre_basis), atol=1e-10, rtol=0)
    np.testing.assert_allclose(proj(mem.old_basis()), proj(pre_basis), atol=1e-10, rtol=0)
    # The old protected directions are still protected.
    p_after = torch.tensor(proj(mem.old_basis()))
    torch.testing.assert_close(p_after @ before, before, atol=1e-10, rtol=0)


@pytest.mark.parametrize("k", [0, 1, 3, 5, 8])
def test_complement_basis(k):
    """complement_basis returns an orthonormal (d, d - k) basis with M M^T + Q Q^T = I."""
    d = 8
    m = torch.tensor(_rotation(np.random.default_rng(k), d)[:, :k])
    q = complement_basis(m)
    assert q.shape == (d, d - k)
    torch.testing.assert_close(q.T @ q, torch.eye(d - k, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(m @ m.T + q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)


def test_energy_threshold():
    """eps_t = lambda_b + (lambda_e - lambda_b) * t / T, and the memory uses it."""
    assert energy_threshold(0, 0.9, 0.99, 10) == 0.9
    assert energy_threshold(5, 0.9, 0.99, 10) == pytest.approx(0.945)
    assert energy_threshold(9, 0.5, 1.0, 10) == pytest.approx(0.95)
    mem = SubspaceMemory(4, 0.2, 0.6, 4)
    assert [mem.threshold(t) for t in range(4)] == pytest.approx([0.2, 0.3, 0.4, 0.5])


# ---------------------------------------------------------------------------
# 6. Free space smaller than rank, and low-rank data
# ---------------------------------------------------------------------------
def test_free_space_smaller_than_rank_gives_zero_rows(caplog):
    """With almost everything protected, A has zero extra rows, orthonormal/sqrt(3) rows, and a warning."""
    rng = np.random.default_rng(6)
    d, rank = 10, 4
    c0 = make_cov(rng, d, rng.uniform(0.8, 1.2, d))
    c1 = make_cov(rng, d, rng.uniform(0.8, 1.2, d))
    mem = SubspaceMemory(d, 0.95, 0.95, 3)
    mem.update(t64(c0), 0)
    free = d - mem.old_basis().shape[1]
    assert mem.mode == RETAIN and 1 <= free < rank

    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        a = mem.down_projection(t64(c1), rank)
    assert a.shape == (rank, d) and a.dtype == torch.float64
    assert nonzero_rows(a) == free
    assert torch.all(a[free:] == 0)
    live = a[:free]
    torch.testing.assert_close(live @ live.T, torch.eye(free, dtype=torch.float64) / 3, atol=1e-12, rtol=0)
    assert (a @ mem.old_basis()).abs().max().item() < 1e-10
    # The live rows span the whole free space here.
    torch.testing.assert_close(3 * live.T @ live, mem.basis @ mem.basis.T, atol=1e-10, rtol=0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER_NAME]
    assert len(warnings) == 1
    assert f"only {free} of rank {rank}" in warnings[0].getMessage()


def test_everything_protected_gives_all_zero_a(caplog):
    """lambda = 1 protects the whole space: A is all zeros (with a warning) and updates are no-ops."""
    rng = np.random.default_rng(66)
    d = 8
    c0 = make_cov(rng, d, rng.uniform(0.8, 1.2, d))
    mem = SubspaceMemory(d, 1.0, 1.0, 3)
    mem.update(t64(c0), 0)
    assert mem.mode == RETAIN and mem.old_basis().shape[1] >= d - 1
    mem.update(t64(make_cov(rng, d, np.ones(d))), 1)  # takes the last free direction, if any
    assert mem.old_basis().shape[1] == d and mem.basis.shape == (d, 0)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        a = mem.down_projection(t64(c0), 3)
    assert torch.all(a == 0)
    assert any("only 0 of rank 3" in r.getMessage() for r in caplog.records)
    mem.update(t64(c0), 2)
    assert mem.basis.shape == (d, 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_first_task_gives_zero_rows(caplog, dtype):
    """Task-0 data with N < d samples: A has exactly N live rows spanning the data, the rest zero."""
    rng = np.random.default_rng(61)
    d, n, rank = 10, 3, 6
    x = rng.standard_normal((n, d))
    cov = torch.tensor(x.T @ x / n, dtype=dtype)
    mem = SubspaceMemory(d, 0.9, 0.9, 2)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        a = mem.down_projection(cov, rank)
    assert nonzero_rows(a) == n
    assert torch.all(a[n:] == 0)
    live = a[:n]
    torch.testing.assert_close(live @ live.T, torch.eye(n, dtype=torch.float64) / 3, atol=1e-6, rtol=0)
    row_space = torch.tensor(proj(np.linalg.qr(x.T)[0]))
    torch.testing.assert_close(3 * live.T @ live, row_space, atol=1e-5, rtol=0)
    assert any(f"only {n} of rank {rank}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_rank_first_task_gives_zero_rows_half_precision(dtype):
    """Half-precision task-0 data with N < d samples: A should still have exactly N live rows."""
    rng = np.random.default_rng(61)
    d, n, rank = 10, 3, 6
    x = rng.standard_normal((n, d))
    cov = torch.tensor(x.T @ x / n).to(dtype)
    a = SubspaceMemory(d, 0.9, 0.9, 2).down_projection(cov, rank)
    assert nonzero_rows(a) == n


def test_remove_mode_rank_above_free_space_is_orthogonal():
    """Remove mode, rank > free-space dim: extra rows must be zero and live rows orthogonal to old_basis()."""
    d = 8
    failures = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        r = _rotation(rng, d)
        cov = t64(r @ np.diag(np.geomspace(1.0, 1e-3, d)) @ r.T)
        mem = SubspaceMemory(d, 0.999, 0.999, 2)
        mem.update(cov, 0)
        assert mem.mode == REMOVE
        free = d - mem.basis.shape[1]
        a = mem.down_projection(cov, d)
        leak = (a @ mem.old_basis()).abs().max().item()
        if nonzero_rows(a) != free or leak > 1e-10:
            failures.append((seed, free, nonzero_rows(a), leak))
    assert not failures, failures


# ---------------------------------------------------------------------------
# 7. dtypes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_work_and_return_float64(dtype):
    """float32 / bfloat16 covariances are accepted; A, basis and old_basis() come back float64."""
    rng = np.random.default_rng(7)
    d = 12
    covs = sequence(70, d, 3, "mixed")
    mem = SubspaceMemory(d, 0.6, 0.9, 3)
    for task, (pre, post) in enumerate(covs):
        a = mem.down_projection(torch.tensor(pre).to(dtype), 3)
        assert a.dtype == torch.float64 and a.shape == (3, d)
        assert torch.isfinite(a).all() and nonzero_rows(a) == 3
        if mem.mode is not None:
            assert (a @ mem.old_basis()).abs().max().item() < 1e-10
        mem.update(torch.tensor(post).to(dtype), task)
        assert mem.basis.dtype == torch.float64 and mem.old_basis().dtype == torch.float64
        b = mem.basis
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
        assert mem.project(torch.tensor(pre).to(dtype)).dtype == torch.float64
    del rng


def test_float32_matches_float64_of_same_values():
    """A float32 covariance gives the same A projector and memory as the float64 tensor of the same values."""
    d = 12
    covs = sequence(71, d, 4, "mixed")
    m32 = SubspaceMemory(d, 0.6, 0.9, 4)
    m64 = SubspaceMemory(d, 0.6, 0.9, 4)
    for task, (pre, post) in enumerate(covs):
        pre32, post32 = torch.tensor(pre, dtype=torch.float32), torch.tensor(post, dtype=torch.float32)
        a32 = m32.down_projection(pre32, 3)
        a64 = m64.down_projection(pre32.double(), 3)
        np.testing.assert_allclose(a_proj(a32), a_proj(a64), atol=1e-6, rtol=0)
        # And close to the unrounded float64 covariance too (float32 rounding of the input only).
        a_orig = m64.down_projection(t64(pre), 3)
        np.testing.assert_allclose(a_proj(a32), a_proj(a_orig), atol=1e-4, rtol=0)
        m32.update(post32, task)
        m64.update(post32.double(), task)
        assert m32.mode == m64.mode
        np.testing.assert_allclose(proj(m32.old_basis()), proj(m64.old_basis()), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# 8. Sign convention and determinism
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("task_count", [0, 1, 3])
def test_down_projection_sign_convention_and_determinism(task_count):
    """Each row's largest-magnitude entry is positive, and equal inputs give bitwise-identical A."""
    d, rank = 16, 5
    covs = sequence(8, d, task_count + 1, "mixed")
    mem = SubspaceMemory(d, 0.6, 0.95, task_count + 1)
    for task in range(task_count):
        mem.update(t64(covs[task][1]), task)
    cov = t64(covs[task_count][0])
    a = mem.down_projection(cov, rank)
    for row in a:
        assert row[row.abs().argmax()] > 0
    assert torch.equal(a, mem.down_projection(cov.clone(), rank))
    assert torch.equal(a, mem.down_projection(cov, rank))
    # A second memory built the same way designs the same A, bit for bit.
    twin = SubspaceMemory(d, 0.6, 0.95, task_count + 1)
    for task in range(task_count):
        twin.update(t64(covs[task][1]), task)
    assert torch.equal(a, twin.down_projection(cov.clone(), rank))
    # Flipping the sign of the input never changes A's sign convention.
    a_neg = mem.down_projection(-cov, rank)
    for row in a_neg:
        assert row[row.abs().argmax()] > 0


# ---------------------------------------------------------------------------
# 9. state_dict round trip
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("tasks_before", [0, 1, 2, 4])
def test_state_dict_round_trip(tasks_before):
    """A fresh memory loaded from state_dict designs the same A and makes the same next update."""
    d = 12
    covs = sequence(9, d, 6, "mixed")
    mem = SubspaceMemory(d, 0.6, 0.95, 6)
    for task in range(tasks_before):
        mem.update(t64(covs[task][1]), task)
    state = mem.state_dict()
    saved_basis = mem.basis.clone()
    state["basis"].add_(1.0)  # the state is a copy: mutating it does not touch the memory
    assert torch.equal(mem.basis, saved_basis)
    state = mem.state_dict()

    buf = io.BytesIO()  # survives serialisation too
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    fresh = SubspaceMemory(d, 0.1, 0.2, 99)  # different hyperparameters get overwritten
    fresh.load_state_dict(loaded)
    loaded["basis"].add_(1.0)  # loading copies too
    assert (fresh.lambda_begin, fresh.lambda_end, fresh.num_tasks) == (0.6, 0.95, 6)
    assert fresh.mode == mem.mode
    assert torch.equal(fresh.basis, mem.basis)
    assert fresh.basis.is_contiguous()
    pre, post = covs[tasks_before]
    assert torch.equal(fresh.down_projection(t64(pre), 4), mem.down_projection(t64(pre), 4))
    fresh.update(t64(post), tasks_before)
    mem.update(t64(post), tasks_before)
    assert fresh.mode == mem.mode
    assert torch.equal(fresh.basis, mem.basis)


def test_load_state_dict_wrong_dim_raises():
    """Loading a state for another dimension raises ValueError naming both dimensions."""
    mem = SubspaceMemory(10, 0.6, 0.9, 3)
    mem.update(t64(sequence(10, 10, 1, "flat")[0][1]), 0)
    other = SubspaceMemory(12, 0.6, 0.9, 3)
    with pytest.raises(ValueError) as info:
        other.load_state_dict(mem.state_dict())
    message = str(info.value)
    # Both dimensions, each named as a dim (not merely the basis-shape mismatch that follows from it).
    assert re.search(r"\bdim\D*\b10\b", message) and re.search(r"\bdim\D*\b12\b", message), message
    assert other.mode is None and other.basis.shape == (12, 0)  # untouched


def test_load_state_dict_rejects_bad_mode_and_basis():
    """load_state_dict rejects an unknown mode and a basis of the wrong shape."""
    mem = SubspaceMemory(6, 0.6, 0.9, 3)
    state = mem.state_dict()
    with pytest.raises(ValueError, match="sideways"):
        mem.load_state_dict({**state, "mode": "sideways"})
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        mem.load_state_dict({**state, "mode": REMOVE, "basis": torch.zeros(5, 2)})


# ---------------------------------------------------------------------------
# 10. Bad inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"dim": 0}, "0"),
        ({"dim": -3}, "-3"),
        ({"lambda_begin": 0.0}, "0.0"),
        ({"lambda_begin": 1.5}, "1.5"),
        ({"lambda_end": -0.1}, "-0.1"),
        ({"lambda_end": 1.01}, "1.01"),
        ({"lambda_begin": float("nan")}, "nan"),
        ({"num_tasks": 0}, "0"),
    ],
)
def test_constructor_rejects_bad_values(kwargs, needle):
    """Constructor: dim < 1, lambda outside (0, 1] and num_tasks < 1 raise ValueError naming the value."""
    args = {"dim": 4, "lambda_begin": 0.5, "lambda_end": 0.9, "num_tasks": 3, **kwargs}
    with pytest.raises(ValueError) as info:
        SubspaceMemory(**args)
    message = str(info.value)
    assert needle in message, message
    assert next(iter(kwargs)) in message, message


def test_bad_covariances_raise():
    """Wrong cov shape, NaN/inf entries and an all-zero covariance in update raise ValueError."""
    d = 4
    mem = SubspaceMemory(d, 0.5, 0.9, 3)
    good = torch.eye(d, dtype=torch.float64)
    for method in (lambda c: mem.down_projection(c, 2), lambda c: mem.update(c, 0), mem.project):
        with pytest.raises(ValueError, match=r"\(5, 5\)"):
            method(torch.eye(5))
        with pytest.raises(ValueError, match=r"\(4, 3\)"):
            method(torch.zeros(4, 3))
        nan = good.clone()
        nan[1, 2] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            method(nan)
        inf = good.clone()
        inf[0, 0] = float("inf")
        with pytest.raises(ValueError, match="inf"):
            method(inf)
    with pytest.raises(ValueError, match="all-zero"):
        mem.update(torch.zeros(d, d), 0)
    assert mem.mode is None and mem.basis.shape == (d, 0)  # failed calls left the memory untouched


@pytest.mark.parametrize("rank", [0, -1, 5, 2.0])
def test_bad_rank_raises(rank):
    """down_projection rejects rank 0, negative, > dim, and non-int ranks, naming the value."""
    mem = SubspaceMemory(4, 0.5, 0.9, 3)
    with pytest.raises(ValueError) as info:
        mem.down_projection(torch.eye(4), rank)
    assert repr(rank) in str(info.value)


def test_threshold_stays_at_lambda_end_past_the_planned_horizon():
    """eps_t rises linearly over the planned T tasks, then stays at lambda_end (a sequence extended past T)."""
    mem = SubspaceMemory(4, 0.5, 0.9, 4)
    assert [round(mem.threshold(t), 12) for t in range(7)] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9]
    mem.update(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)), 6)  # past T: allowed
    assert mem.mode is not None


@pytest.mark.parametrize("task_index", [-1, 1.0, True])
def test_bad_task_index_raises(task_index):
    """update rejects a negative or non-int task_index, naming the value."""
    mem = SubspaceMemory(4, 0.5, 0.9, 3)
    with pytest.raises(ValueError) as info:
        mem.update(torch.eye(4), task_index)
    assert repr(task_index) in str(info.value)
    assert mem.mode is None


@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_batched_decompositions_equal_one_at_a_time(name):
    """Memories of equal size decomposed together (batched_eigh, as InfLoRA does every task's groups) design the
    same A and grow the same memories as one at a time: the same k and modes, subspaces within 1e-10."""
    seed, d, tasks, lamb, lame, spectra, rank = ORACLE_CASES[name]
    histories = [list(sequence(seed + i, d, tasks, spectra)) for i in range(3)]
    alone = [SubspaceMemory(d, lamb, lame, tasks) for _ in histories]
    together = [SubspaceMemory(d, lamb, lame, tasks) for _ in histories]
    for task in range(tasks):
        for phase in (0, 1):  # design (pre-task covariance), then update (post-task)
            covs = [t64(h[task][phase]) for h in histories]
            eigs = batched_eigh([m.eigh_operand(c) for m, c in zip(together, covs, strict=True)], stack=True)
            for one, many, c, eig in zip(alone, together, covs, eigs, strict=True):
                if phase == 0:
                    a, b = one.down_projection(c, rank), many.down_projection(c, rank, eig)
                    assert nonzero_rows(a) == nonzero_rows(b)
                    assert principal_angle(row_space(a), row_space(b)) <= 1e-10
                else:
                    one.update(c, task)
                    many.update(c, task, eig)
                    assert (one.mode, one.protected_dim) == (many.mode, many.protected_dim), task
                    assert principal_angle(one.basis, many.basis) <= 1e-10


def test_batched_eigh_groups_by_size_and_refuses_non_square():
    """Matrices of several sizes: each its own eigh, equal sizes stacked; bit-identical on the host."""
    g = torch.Generator().manual_seed(0)
    mats = [(lambda x: x @ x.T)(torch.randn(n, n, generator=g, dtype=torch.float64)) for n in (4, 6, 4, 4, 6)]
    for (w, v), m in zip(batched_eigh(mats, stack=True), mats, strict=True):
        w1, v1 = torch.linalg.eigh(m)
        assert torch.equal(w, w1) and torch.equal(v, v1)
    with pytest.raises(ValueError, match="matrix 1 has shape \\(2, 3\\)"):
        batched_eigh([mats[0], torch.zeros(2, 3)])


def test_stacked_eigh_refuses_mismatched_sizes_before_any_work():
    """One stacked call takes one size: a mismatch is named (which matrix, both shapes), not padded silently."""
    with pytest.raises(ValueError, match=r"matrix 2 is \(6, 6\) torch.float64 on cpu, matrix 0 is \(4, 4\)"):
        stacked_eigh([torch.eye(4, dtype=torch.float64)] * 2 + [torch.eye(6, dtype=torch.float64)])
    assert stacked_eigh([]) == []
