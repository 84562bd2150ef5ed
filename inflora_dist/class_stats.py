"""Class statistics: a Gaussian of the features of every class seen so far (pure math, plus one reduction).

After task t, one no-grad pass over its training data sums, for each class of
the task, the features evaluation uses (the backbone's [CLS] output), their
second moments and the count, in float64 (`ClassSums`). The sums of all the
task's classes travel in one flat all-reduce, so the statistics equal those of
one process over all the data, however it is split. Then, in float64,

    mean_c = s_c / n_c
    cov_c  = (S_c - n_c mean_c mean_c^T) / (n_c - 1) + reg I

(torch.cov's unbiased estimate plus `reg` = 1e-4 I, as the reference's
`_compute_class_mean`). `ClassStatistics` keeps every seen class in one of four
forms, float32 on the host:

    full      one d x d covariance per class (the reference; classes x d^2 floats)
    diagonal  per-class variances only (classes x d)
    shared    one pooled within-class covariance for all classes (d x d)
    none      means only (prototype prediction; classifier alignment needs a covariance)

Classes are indexed by logit position (the order of the task sequence), so the
classes of task t are the contiguous positions [offsets[t], offsets[t+1]).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from inflora_dist import dist

logger = logging.getLogger(__name__)

COVARIANCE_FORMS = ("full", "diagonal", "shared", "none")
#: The reference's regulariser of every class covariance.
DEFAULT_REG = 1e-4


class ClassSums:
    """Per-class sums of one task's features: counts, sums and second moments (float64).

    `first` is the logit position of the task's first class and `class_ids` the
    dataset labels of its classes (for messages). The second moments follow
    `form`: per-class outer products (full), per-class squares (diagonal), one
    outer product over all the task's rows (shared), or none.
    """

    def __init__(
        self, first: int, class_ids: Sequence[int], dim: int, form: str, device: torch.device | None = None
    ) -> None:
        if form not in COVARIANCE_FORMS:
            raise ValueError(f"covariance form must be one of {list(COVARIANCE_FORMS)}, got {form!r}")
        self.first, self.class_ids, self.dim, self.form = first, list(class_ids), dim, form
        c, f64 = len(self.class_ids), torch.float64
        self.counts = torch.zeros(c, dtype=f64, device=device)
        self.sums = torch.zeros(c, dim, dtype=f64, device=device)
        shape = {"full": (c, dim, dim), "diagonal": (c, dim), "shared": (dim, dim), "none": (0,)}[form]
        self.second = torch.zeros(shape, dtype=f64, device=device)

    def add(self, features: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor) -> None:
        """Add a batch: features (B, d), logit positions (B,), row weights (B,) (0 for padding rows)."""
        x = features.detach().to(device=self.sums.device, dtype=torch.float64)
        w = weight.detach().to(device=self.sums.device, dtype=torch.float64)
        local = positions.to(self.sums.device) - self.first
        c = len(self.class_ids)
        outside = (w != 0) & ((local < 0) | (local >= c))
        if bool(outside.any()):
            raise ValueError(
                f"a batch holds logit positions {sorted(set((local[outside] + self.first).tolist()))} outside this "
                f"task's classes (positions {self.first}..{self.first + c - 1})"
            )
        onehot = F.one_hot(local.clamp(0, c - 1), c).to(torch.float64) * w[:, None]  # (B, C), weighted
        self.counts += onehot.sum(0)
        self.sums += onehot.T @ x
        if self.form == "diagonal":
            self.second += onehot.T @ (x * x)
        elif self.form == "shared":
            self.second += (x * w[:, None]).T @ x
        elif self.form == "full":
            for k in torch.unique(local[w != 0]).tolist():
                rows = local == k
                xc = x[rows]
                self.second[k].addmm_((xc * w[rows, None]).T, xc)

    def all_reduce_(self, bucket_bytes: int = dist.DEFAULT_BUCKET_BYTES) -> int:
        """Sum the counts, sums and second moments over all ranks, packed into flat float64 buckets of at most
        `bucket_bytes` (the covariance reduction's path). Returns the number of collectives. Collective."""
        device = dist.collective_device()
        parts = [p.to(device) for p in (self.counts, self.sums, self.second)]
        collectives = dist.sum_in_buckets_([dist.Flat(p) for p in parts], bucket_bytes)
        for mine, reduced in zip((self.counts, self.sums, self.second), parts, strict=True):
            if reduced is not mine:
                mine.copy_(reduced)
        return collectives


class ClassStatistics:
    """Mean and covariance (in `form`) of every class seen so far, float32 on the host.

    Grown one task at a time with `extend`; `state_dict` / `load_state_dict`
    give tensors for safetensors checkpoints.
    """

    def __init__(self, dim: int, form: str = "full", reg: float = DEFAULT_REG) -> None:
        if form not in COVARIANCE_FORMS:
            raise ValueError(f"covariance form must be one of {list(COVARIANCE_FORMS)}, got {form!r}")
        if reg < 0:
            raise ValueError(f"the covariance regulariser must be >= 0, got {reg}")
        self.dim, self.form, self.reg = dim, form, reg
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.means = torch.zeros(0, dim)
        self.covariances = torch.zeros({"full": (0, dim, dim), "diagonal": (0, dim)}.get(form, (0,)))
        # shared: the pooled within-class scatter and its degrees of freedom (sum of n_c - 1), float64
        self.scatter = torch.zeros((dim, dim) if form == "shared" else (0,), dtype=torch.float64)
        self.dof = torch.zeros((), dtype=torch.float64)

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def nbytes(self) -> int:
        """Host memory held, in bytes."""
        tensors = (self.counts, self.means, self.covariances, self.scatter)
        return sum(t.numel() * t.element_size() for t in tensors)

    def extend(self, sums: ClassSums) -> None:
        """Append the classes of one task from its (reduced) sums; they must follow the classes seen so far.

        A class with one sample has no sample covariance: it gets `reg` I alone,
        with a warning. A class with no sample is an error (its statistics are undefined).
        """
        if sums.first != len(self) or sums.dim != self.dim or sums.form != self.form:
            raise ValueError(
                f"sums of positions {sums.first}.. ({sums.dim}-dim, {sums.form}) do not continue these statistics "
                f"({len(self)} classes, {self.dim}-dim, {self.form})"
            )
        n = sums.counts.cpu()
        empty = [cid for cid, k in zip(sums.class_ids, n.tolist(), strict=True) if k <= 0]
        if empty:
            raise ValueError(f"classes {empty} have no training sample: their statistics are undefined")
        single = [cid for cid, k in zip(sums.class_ids, n.tolist(), strict=True) if k < 2]
        if single:
            logger.warning("classes %s have a single training sample: covariance set to %g I", single, self.reg)
        mean = sums.sums.cpu() / n[:, None]
        second = sums.second.cpu()
        dof = (n - 1).clamp(min=0)
        eye = torch.eye(self.dim, dtype=torch.float64)
        if self.form == "full":
            scatter = second - n[:, None, None] * mean[:, :, None] * mean[:, None, :]
            cov = scatter / dof.clamp(min=1)[:, None, None] + self.reg * eye
            self.covariances = torch.cat([self.covariances, cov.float()])
        elif self.form == "diagonal":
            var = (second - n[:, None] * mean * mean) / dof.clamp(min=1)[:, None] + self.reg
            self.covariances = torch.cat([self.covariances, var.float()])
        elif self.form == "shared":
            self.scatter = self.scatter + second - torch.einsum("c,ci,cj->ij", n, mean, mean)
            self.dof = self.dof + dof.sum()
        self.counts = torch.cat([self.counts, n])
        self.means = torch.cat([self.means, mean.float()])

    def covariance(self, position: int) -> torch.Tensor:
        """The (d, d) float64 covariance of the class at `position` (diagonal forms made full)."""
        if self.form == "none":
            raise ValueError("these class statistics keep means only (covariance form 'none')")
        if self.form == "full":
            return self.covariances[position].double()
        if self.form == "diagonal":
            return torch.diag(self.covariances[position].double())
        eye = torch.eye(self.dim, dtype=torch.float64)
        return self.scatter / self.dof.clamp(min=1) + self.reg * eye

    def sample(
        self, count: int, num_classes: int, scales: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` features per class 0..num_classes-1 from N(scale_c mean_c, cov_c); (features f32, positions).

        Host computation driven by `generator` alone, so the draw is reproducible.
        """
        if self.form == "none":
            raise ValueError("sampling features needs a covariance: set ca.covariance to full, diagonal or shared")
        if num_classes > len(self):
            raise ValueError(f"asked for {num_classes} classes, the statistics hold {len(self)}")
        chunks = []
        shared = _cholesky(self.covariance(0)) if self.form == "shared" else None
        for c in range(num_classes):
            z = torch.randn(count, self.dim, generator=generator, dtype=torch.float64)
            mean = self.means[c].double() * float(scales[c])
            if self.form == "diagonal":
                chunks.append(mean + z * self.covariances[c].double().sqrt())
            else:
                factor = shared if shared is not None else _cholesky(self.covariance(c))
                chunks.append(mean + z @ factor.T)
        labels = torch.arange(num_classes).repeat_interleave(count)
        return torch.cat(chunks).float(), labels

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors file (the form and regulariser are config, checked on load)."""
        state = {"counts": self.counts, "means": self.means}
        if self.form in ("full", "diagonal"):
            state["covariances"] = self.covariances
        if self.form == "shared":
            state.update(scatter=self.scatter, dof=self.dof)
        return {k: v.contiguous() for k, v in state.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict` output, checking that its shapes fit this form and dimension."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"class statistics hold {sorted(state)}, the {self.form!r} form needs {sorted(expected)} "
                "(was the checkpoint written with another ca.covariance?)"
            )
        k = state["means"].shape[0]
        shapes = {"counts": (k,), "means": (k, self.dim), "covariances": (k, self.dim, self.dim)}
        shapes.update(scatter=(self.dim, self.dim), dof=())
        if self.form == "diagonal":
            shapes["covariances"] = (k, self.dim)
        for key, value in state.items():
            if tuple(value.shape) != shapes[key]:
                raise ValueError(f"class statistics {key} has shape {tuple(value.shape)}, expected {shapes[key]}")
        self.counts = state["counts"].double().clone()
        self.means = state["means"].float().clone()
        if "covariances" in state:
            self.covariances = state["covariances"].float().clone()
        if "scatter" in state:
            self.scatter, self.dof = state["scatter"].double().clone(), state["dof"].double().clone()


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of a float64 covariance; 1e-4 I is added until it is positive definite (as the reference)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for _ in range(10):
        factor, info = torch.linalg.cholesky_ex(cov)
        if int(info) == 0:
            return factor
        cov = cov + DEFAULT_REG * eye
    raise ValueError("a class covariance is not positive definite even after adding 1e-3 I")


def nearest_mean(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The position of the most cosine-similar class mean for each row (the prototype classifier)."""
    sims = F.normalize(features.float(), dim=-1) @ F.normalize(means.to(features.device).float(), dim=-1).T
    return sims.argmax(1)
