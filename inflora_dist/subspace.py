"""Subspace math of InfLoRA (Liang & Li, CVPR 2024): pure functions on tensors.

Notation (per input group, d = input dimension):
  C    (d, d)  uncentred input covariance, (1/N) sum_n x_n x_n^T over tokens.
  M    (d, k)  orthonormal basis of the old tasks' subspace ("remove" mode).
  Q    (d, q)  orthonormal basis of its complement, the free space ("retain" mode).
  A_t  (r, d)  the designed, frozen down-projection of task t.

DualGPM stores whichever of M and Q is smaller, so the memory never exceeds
d x d/2. Every decomposition runs in float64 whatever the input dtype: the
energy ratios compare sums of squared singular values whose tail would drown in
float32 rounding. They run where the covariance is (the GPU under NCCL:
cuSOLVER; the host otherwise); results come back as float64 on the host, and
stored bases live there. Every decomposition uses the symmetric eigensolver
(eigh), never the SVD: on cuSOLVER a float64 SVD costs 10-25x the eigh of the
same size (30+ s at d = 11008, against 1.2 s). The unprojected covariance
(task 0) is symmetric PSD: its eigenpairs are its singular pairs. For the
projected product B = F^T C (F the free space's basis; the same left singular
vectors as (I - M M^T) C or Q Q^T C) the left singular vectors are the
eigenvectors of the Gram matrix B B^T, whose eigenvalues are exactly the
squared singular values that DualGPM's energy rule sums (`_gram_svd`). Vectors
are defined up to sign, which `_fix_signs` settles.

The math follows `methods/inflora.py` of the reference repository
(liangyanshuo/InfLoRA), with two documented departures:
  * a first task whose kept dimension is already >= d/2 stores the free-space
    basis U[:, k:] (the reference stores U[:, :k] and labels it the free space);
  * growth never adds directions that carry no energy (numerically zero singular
    values): those singular vectors are arbitrary and could point into the
    protected subspace.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

REMOVE = "remove"
RETAIN = "retain"

#: The reference scales the designed A by 1/sqrt(3) (the std of LoRA's kaiming-uniform init).
A_SCALE = 1.0 / math.sqrt(3.0)


def energy_threshold(task_index: int, lambda_begin: float, lambda_end: float, num_tasks: int) -> float:
    """DualGPM threshold eps_t = lambda_b + (lambda_e - lambda_b) * min(t, T) / T for task t (0-based).

    T is the planned horizon (`inflora.planned_tasks`, by default the sequence's
    length): a sequence that grows past it keeps lambda_end.
    """
    return lambda_begin + (lambda_end - lambda_begin) * min(task_index, num_tasks) / num_tasks


def _top_eigenvalue(c: torch.Tensor, iters: int = 30) -> float:
    """Estimate of lambda_max of a PSD matrix by power iteration (only a scale is needed).

    Bounded below by trace / d, which lambda_max always reaches.
    """
    d = c.shape[0]
    v = torch.full((d,), d**-0.5, dtype=c.dtype, device=c.device)  # fixed start: the same estimate on every rank
    for _ in range(iters):
        w = c @ v
        norm = torch.linalg.vector_norm(w)
        if norm == 0:
            break
        v = w / norm
    return max(float(v @ (c @ v)), float(torch.trace(c)) / d)


def _rank_tolerance(cov: torch.Tensor, c64: torch.Tensor) -> float:
    """Singular values at or below this are numerically zero: their vectors are arbitrary.

    numpy's matrix_rank rule, lambda_max * d * eps, with eps of the dtype the
    covariance came in: its rounding noise is what must not count as signal.
    """
    dtype = cov.dtype if cov.dtype.is_floating_point else torch.float64
    return _top_eigenvalue(c64) * c64.shape[0] * torch.finfo(dtype).eps


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-magnitude entry is positive.

    Singular vectors are defined up to sign; a fixed convention makes A
    identical on every rank and across runs (as sklearn's svd_flip does).
    """
    if vectors.shape[1] == 0:
        return vectors
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1], device=vectors.device)])
    signs[signs == 0] = 1.0
    return vectors * signs


def complement_basis(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, d - k) of the orthogonal complement of the columns of `basis` (d, k)."""
    d, k = basis.shape
    if k == 0:
        return torch.eye(d, dtype=basis.dtype, device=basis.device)
    q_full, _ = torch.linalg.qr(basis, mode="complete")  # (d, d); first k columns span `basis`
    return q_full[:, k:]


def principal_angle(u: torch.Tensor, v: torch.Tensor) -> float:
    """The largest principal angle (radians) between the spans of two orthonormal bases (d, k) of equal width.

    Computed as arcsin of the spectral norm of (I - U U^T) V, accurate near zero
    (where arccos of the cosines loses half the digits).
    """
    if u.shape != v.shape:
        raise ValueError(f"bases must have the same shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    if u.shape[1] == 0:
        return 0.0
    u, v = u.double(), v.to(device=u.device, dtype=torch.float64)
    residual = v - u @ (u.T @ v)
    return math.asin(min(1.0, float(torch.linalg.matrix_norm(residual, ord=2))))


def row_space(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal float64 basis (d, r') of the span of a designed A's nonzero rows (a row is zero where no
    direction had energy): what A protects and trains in, whatever the order or sign of its rows."""
    return torch.linalg.qr(a[a.abs().sum(dim=1) > 0].double().T)[0]


Eigh = tuple[torch.Tensor, torch.Tensor]  # (eigenvalues ascending, eigenvectors), as torch.linalg.eigh returns


def _require_square(i: int, m: torch.Tensor) -> None:
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"eigh decomposes square matrices; matrix {i} has shape {tuple(m.shape)}")


def stacked_eigh(mats: Sequence[torch.Tensor]) -> list[Eigh]:
    """torch.linalg.eigh of symmetric matrices of one shape, dtype and device in one batched call (small
    decompositions on a GPU are bound by the per-call latency, not the flops). Raises ValueError naming the
    first matrix that differs from the first, before any decomposition."""
    if not mats:
        return []
    kind = (tuple(mats[0].shape), mats[0].dtype, mats[0].device)
    for i, m in enumerate(mats):
        _require_square(i, m)
        if (tuple(m.shape), m.dtype, m.device) != kind:
            raise ValueError(
                f"a stacked eigh needs matrices of one size, dtype and device: matrix {i} is "
                f"{tuple(m.shape)} {m.dtype} on {m.device}, matrix 0 is {kind[0]} {kind[1]} on {kind[2]}"
            )
    w, v = torch.linalg.eigh(torch.stack(list(mats)))
    return [(w[j], v[j]) for j in range(len(mats))]


def batched_eigh(mats: Sequence[torch.Tensor], stack: bool | None = None) -> list[Eigh]:
    """torch.linalg.eigh of every symmetric matrix of `mats`; with `stack` those of one shape, dtype and device in
    one call (`stacked_eigh`). `stack` None: on accelerators only (on the host a stack runs the same LAPACK
    routine per matrix, no faster: `bench scale`'s batched_ratio). The results are the one-at-a-time ones: bit
    for bit on the host (tested), within rounding on a GPU (the subspaces to 1e-10)."""
    results: list[Eigh | None] = [None] * len(mats)
    by_kind: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        _require_square(i, m)
        by_kind.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for (_, _, device), members in by_kind.items():
        if len(members) == 1 or not (device.type != "cpu" if stack is None else stack):
            for i in members:
                results[i] = torch.linalg.eigh(mats[i])
            continue
        for i, eig in zip(members, stacked_eigh([mats[i] for i in members]), strict=True):
            results[i] = eig
    return results  # type: ignore[return-value]


def _gram_svd(mat: torch.Tensor, eig: Eigh | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (f, f) and singular values (f,) of a float64 (f, d) matrix B, from eigh(B B^T).

    The eigenvalues of B B^T are the squared singular values, descending after
    the flip. Forming the Gram matrix squares the condition number: eigenvalues
    below its own rounding floor (w_max * f * eps) carry no information and are
    set to exactly zero, so that the rank tolerance of the callers treats their
    (arbitrary) vectors as energy-free. Above the floor the values are those of
    the SVD to float64 precision of the squares, which is what the energy sums read.
    """
    w, v = torch.linalg.eigh(mat @ mat.T) if eig is None else eig
    w, v = w.flip(0), v.flip(1)
    floor = float(w[0]) * w.numel() * torch.finfo(torch.float64).eps if w.numel() else 0.0
    return v, torch.where(w > floor, w, torch.zeros_like(w)).sqrt()


def _symmetric_svd(c: torch.Tensor, eig: Eigh | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SVD of a symmetric matrix from its eigendecomposition (eigh: about 2x faster than svd, measured).

    Singular values are |eigenvalues| (a PSD covariance's rounding can make
    the smallest slightly negative), sorted descending; the left singular
    vectors are the eigenvectors, in that order.
    """
    w, v = torch.linalg.eigh(c) if eig is None else eig
    order = torch.argsort(w.abs(), descending=True, stable=True)
    return v[:, order], w.abs()[order]


def _stored(basis: torch.Tensor) -> torch.Tensor:
    """A row-major host copy: LAPACK returns column-major factors, and collectives send raw memory."""
    return basis.to("cpu").clone(memory_format=torch.contiguous_format)


class SubspaceMemory:
    """DualGPM memory of one input group: the old tasks' subspace, stored in the cheaper mode.

    `mode` is None before any task is stored, then "remove" (the stored basis is
    M, the protected subspace) or "retain" (the stored basis is Q, the free space).
    """

    def __init__(self, dim: int, lambda_begin: float, lambda_end: float, num_tasks: int) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        for name, value in (("lambda_begin", lambda_begin), ("lambda_end", lambda_end)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        self.dim = dim
        self.lambda_begin = float(lambda_begin)
        self.lambda_end = float(lambda_end)
        self.num_tasks = num_tasks
        self.mode: str | None = None
        self.basis = torch.zeros(dim, 0, dtype=torch.float64)  # M (remove) or Q (retain)

    # ------------------------------------------------------------------ queries
    def threshold(self, task_index: int) -> float:
        """The energy threshold eps_t used by `update` after task `task_index`."""
        return energy_threshold(task_index, self.lambda_begin, self.lambda_end, self.num_tasks)

    @property
    def protected_dim(self) -> int:
        """k, the dimension of the protected old-task subspace."""
        return self.dim - self.basis.shape[1] if self.mode == RETAIN else self.basis.shape[1]

    def old_basis(self) -> torch.Tensor:
        """(dim, k) orthonormal float64 basis of the protected old-task subspace, in either mode."""
        if self.mode == RETAIN:
            return complement_basis(self.basis)
        return self.basis.clone()

    def _free(self, device: torch.device) -> torch.Tensor:
        """(d, f) orthonormal basis of the free space (a stored memory only), on `device`."""
        basis = self.basis.to(device)
        return basis if self.mode == RETAIN else complement_basis(basis)

    def eigh_operand(self, cov: torch.Tensor) -> torch.Tensor:
        """The symmetric matrix whose eigh `_projected_svd` takes: C before any task, else F^T C C F (f x f), F
        the free space's basis. What `batched_eigh` decomposes for several memories at once."""
        c = self._check_cov(cov)
        if self.mode is None:
            return c
        b = self._free(c.device).T @ c
        return b @ b.T

    def _projected_svd(self, c: torch.Tensor, eig: Eigh | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left singular vectors (d, f) and values of the projected covariance F F^T C.

        Computed in the free space's own coordinates, as F @ U with U the left
        singular vectors of F^T C (`_gram_svd`: eigh of F^T C C F): every vector
        then lies in the free space by construction, even those of (numerically)
        zero singular values, whose direction is otherwise arbitrary.
        Mathematically the same as the SVD of (I - M M^T) C or Q Q^T C that the
        reference takes.
        """
        if self.mode is None:
            return _symmetric_svd(c, eig)
        free = self._free(c.device)  # (d, f), on the covariance's device
        u, s = _gram_svd(free.T @ c, eig)  # (f, f), (f,)
        return free @ u, s

    def project(self, cov: torch.Tensor) -> torch.Tensor:
        """The covariance with the old subspace taken out: C, (I - M M^T) C or Q Q^T C (float64)."""
        c = self._check_cov(cov)
        basis = self.basis.to(c.device)
        if self.mode == REMOVE:
            return c - basis @ (basis.T @ c)
        if self.mode == RETAIN:
            return basis @ (basis.T @ c)
        return c

    def down_projection(self, cov: torch.Tensor, rank: int, eig: Eigh | None = None) -> torch.Tensor:
        """Design A_t (rank, dim), float64: top-`rank` left singular vectors of `project(cov)`, transposed, / sqrt(3).

        When the projected covariance has fewer than `rank` directions with
        energy (the free space is smaller than `rank`, or the task's data spans
        too few directions of it), the remaining rows are zero and a warning is
        logged: their singular vectors would be arbitrary and could reach into
        the protected subspace. A zero row trains nothing (B's matching column
        gets no gradient), so the branch is simply of lower rank.
        """
        if not isinstance(rank, int) or not 1 <= rank <= self.dim:
            raise ValueError(f"rank must be an int in [1, {self.dim}], got {rank!r}")
        c = self._check_cov(cov)
        u, s = self._projected_svd(c, eig)
        usable = int((s[:rank] > _rank_tolerance(cov, c)).sum())
        a = torch.zeros(rank, self.dim, dtype=torch.float64)
        a[:usable] = (_fix_signs(u[:, :usable]).T * A_SCALE).cpu()
        if usable < rank:
            logger.warning(
                "only %d of rank %d directions carry energy outside the old-task subspace "
                "(dim %d, mode %s); the other rows of A are zero",
                usable,
                rank,
                self.dim,
                self.mode,
            )
        return a

    # ------------------------------------------------------------------ DualGPM
    def update(self, cov: torch.Tensor, task_index: int, eig: Eigh | None = None) -> None:
        """Grow the old-task subspace with task `task_index`'s post-training covariance (DualGPM). `eig`: the
        eigh of `eigh_operand(cov)` when already computed (batched_eigh), in either method."""
        if not isinstance(task_index, int) or isinstance(task_index, bool) or task_index < 0:
            raise ValueError(f"task_index must be an int >= 0, got {task_index!r}")
        c = self._check_cov(cov)
        eps_t = self.threshold(task_index)
        total = float((c**2).sum())  # sum of squared singular values = squared Frobenius norm
        if total == 0.0:
            raise ValueError("cannot update the subspace memory from an all-zero covariance (no tokens seen?)")
        tol = _rank_tolerance(cov, c)
        if self.mode is None:
            self._store_first(*_symmetric_svd(c, eig), eps_t)
        elif self.mode == REMOVE:
            self._grow_remove(c, total, eps_t, tol, eig)
        else:
            self._grow_retain(c, total, eps_t, tol, eig)
        if self.mode == REMOVE and self.basis.shape[1] > self.dim / 2:
            # Storing the complement is cheaper from here on (and exact: same span).
            self.basis = _stored(complement_basis(self.basis))
            self.mode = RETAIN

    def _store_first(self, u: torch.Tensor, s: torch.Tensor, eps_t: float) -> None:
        # Eq. 5: k = #{cumsum(sigma^2) / sum(sigma^2) < eps}, at least 1.
        energy = torch.cumsum(s**2, 0)
        ratio = energy / energy[-1]  # the last ratio is exactly 1, whichever solver gave s
        k = max(int((ratio < eps_t).sum()), 1)  # one host sync: k decides the stored shape
        if k < self.dim / 2:
            self.mode, self.basis = REMOVE, _stored(u[:, :k])
        else:
            # The free space is the smaller one: store it (the reference stores u[:, :k] here).
            self.mode, self.basis = RETAIN, _stored(u[:, k:])

    def _grow_remove(self, c: torch.Tensor, total: float, eps_t: float, tol: float, eig: Eigh | None) -> None:
        m = self.basis.to(c.device)
        u, s = self._projected_svd(c, eig)  # Eq. 8: projected representation
        captured = (total - float((s**2).sum())) / total  # energy the old subspace already holds
        ratios = ((s**2) / total).cpu()  # read one by one below: no device sync per step
        budget = int((s > tol).sum())  # directions with energy
        r = 0
        while r < budget and captured < eps_t:  # Eq. 9
            captured += float(ratios[r])
            r += 1
        if r == 0:
            return
        self.basis = _stored(torch.cat([m, u[:, :r]], dim=1))  # r <= d - k: never wider than d

    def _grow_retain(self, c: torch.Tensor, total: float, eps_t: float, tol: float, eig: Eigh | None) -> None:
        u, s = self._projected_svd(c, eig)  # energy that still lies in the free space
        free_energy = float((s**2).sum()) / total
        ratios = ((s**2) / total).cpu()  # read one by one below: no device sync per step
        budget = int((s > tol).sum())  # at most q
        r = 0
        while r < budget and free_energy >= 1.0 - eps_t:
            free_energy -= float(ratios[r])
            r += 1
        if r == 0:
            return
        # u = Q u' with u' an orthonormal basis of R^q: its last q - r columns
        # span the free space minus the r new directions.
        self.basis = _stored(u[:, r:])

    # ------------------------------------------------------------------ helpers
    def _check_cov(self, cov: torch.Tensor) -> torch.Tensor:
        if cov.shape != (self.dim, self.dim):
            raise ValueError(f"covariance must have shape ({self.dim}, {self.dim}), got {tuple(cov.shape)}")
        c = cov.detach().to(dtype=torch.float64)  # decomposed on its own device (see the module docstring)
        if not torch.isfinite(c).all():
            raise ValueError("covariance contains NaN or inf")
        return c

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict:
        """Tensors and plain values only (safe to store as safetensors + JSON)."""
        return {
            "dim": self.dim,
            "lambda_begin": self.lambda_begin,
            "lambda_end": self.lambda_end,
            "num_tasks": self.num_tasks,
            "mode": self.mode,
            "basis": self.basis.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a memory saved by `state_dict`; the dimension must match."""
        if int(state["dim"]) != self.dim:
            raise ValueError(f"state is for dim {state['dim']}, this memory has dim {self.dim}")
        mode = state["mode"]
        if mode not in (None, REMOVE, RETAIN):
            raise ValueError(f"unknown subspace memory mode {mode!r}")
        basis = torch.as_tensor(state["basis"], dtype=torch.float64)
        if basis.ndim != 2 or basis.shape[0] != self.dim:
            raise ValueError(f"basis must have shape ({self.dim}, k), got {tuple(basis.shape)}")
        self.lambda_begin = float(state["lambda_begin"])
        self.lambda_end = float(state["lambda_end"])
        self.num_tasks = int(state["num_tasks"])
        self.mode = mode
        self.basis = _stored(basis)
