"""The distributed covariance aggregator.

For each input group, forward pre-hooks sum x x^T over tokens and count the
tokens (padding masked out). Across processes the sums and counts are added
exactly (torch.distributed SUM), so C = sum / count is what one process would
compute over the union of the data, however it is split:

  * all-reduce mode: every rank gets every group's covariance;
  * owner mode: each group is reduced to one owner rank (groups assigned to
    balance the d^3 cost of decomposing them), so only the owner ever holds the
    reduced covariance; the caller broadcasts what the owner derives from it.

Precision: each batch's x^T x is one GEMM in `gemm_dtype` (float32 on
accelerators), added into a running sum in `dtype` (float64 by default), so a
pass over millions of tokens with a few huge activation coordinates keeps the
small directions that a float32 running sum rounds away.

Traffic: the sums are symmetric, so only their upper triangles (d(d+1)/2
values) and the token counts travel, packed back to back into flat buckets of
at most `bucket_bytes` (`dist.sum_in_buckets_`): a pass costs ceil(bytes / cap)
collectives and one bucket of extra memory, and the reduced triangle is
mirrored back into the full matrix.

Budget: with `inflora.covariance_max_tokens` a pass reads only the first
samples of the task's data (in the pass's fixed order) whose tokens fit the
budget (`TokenBudget`): the same samples at any world size, so the
covariances stay world-size invariant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from inflora_dist import dist


def default_gemm_dtype(device: torch.device) -> torch.dtype:
    """dtype of the per-batch x^T x: float64 on CPU (cheap there, and the same sums however the data is
    split into batches), float32 on accelerators (the GEMM is what costs; the running sum stays float64)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def traffic_bytes(d: int, bytes_per_element: int) -> int:
    """Bytes one group adds to a reduction: its upper triangle and token count, (d(d+1)/2 + 1) * b."""
    return (d * (d + 1) // 2 + 1) * bytes_per_element


def mirror_(upper: torch.Tensor) -> torch.Tensor:
    """Overwrite the lower triangle of a square matrix with its upper one (exact; one d^2 temporary)."""
    upper.triu_()
    upper += upper.triu(1).T
    return upper


class CovarianceCollector:
    """Sums x x^T and token counts per input group via forward pre-hooks.

    `modules` maps each group to one module that reads the group's input (one
    hook per group is enough: its members read the same tensor). Use
    `capturing()` around the pass and `token_mask(mask)` around each batch whose
    tokens carry padding: `mask` has the shape of the input without its last
    dimension (e.g. (batch, seq)), or a leading part of it ((batch,) weights
    whole rows); 1 for real tokens, 0 for padding. A model whose layers read
    different tokens (an encoder-decoder) passes a dict of masks by side, and
    `sides` names each group's side.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        dims: Mapping[str, int],
        dtype: torch.dtype = torch.float64,
        gemm_dtype: torch.dtype | None = None,
        bucket_bytes: int = dist.DEFAULT_BUCKET_BYTES,
        sides: Mapping[str, str] | None = None,
    ):
        if set(modules) != set(dims):
            raise ValueError(f"modules and dims name different groups: {sorted(set(modules) ^ set(dims))}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.modules = dict(modules)
        self.dims = dict(dims)
        self.dtype = dtype  # of the running sums
        self.gemm_dtype = gemm_dtype  # of each batch's x^T x; None: default_gemm_dtype of the activations' device
        self.bucket_bytes = bucket_bytes
        self.sides = dict(sides) if sides is not None else None  # group -> key of its mask in a dict of masks
        #: What the last reduction sent: {"bytes": ..., "collectives": ...} (for benchmarks and logs).
        self.last_reduction: dict[str, int] = {}
        self.sums: dict[str, torch.Tensor] = {}  # (d, d), allocated on first use
        self.counts: dict[str, torch.Tensor] = {}  # scalar, same dtype as the sums
        self._mask: torch.Tensor | Mapping[str, torch.Tensor] | None = None

    @property
    def groups(self) -> list[str]:
        """Group names in the fixed order every rank uses for collectives."""
        return sorted(self.dims)

    def reset(self) -> None:
        """Drop the sums (after they are reduced and used)."""
        self.sums.clear()
        self.counts.clear()

    def _buffers(self, group: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if group not in self.sums:
            d = self.dims[group]
            self.sums[group] = torch.zeros(d, d, dtype=self.dtype, device=device)
            self.counts[group] = torch.zeros((), dtype=self.dtype, device=device)
        return self.sums[group], self.counts[group]

    def _hook(self, group: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            total, count = self._buffers(group, x.device)
            x = x.reshape(-1, x.shape[-1]).to(self.gemm_dtype or default_gemm_dtype(x.device))  # (tokens, d)
            if self._mask is None:
                self._add(total, x, x)
                count += x.shape[0]
                return
            mask = self._mask
            if isinstance(mask, Mapping):
                if self.sides is None:
                    raise ValueError(f"masks by side {sorted(mask)} need the collector's sides (group -> side)")
                mask = mask[self.sides[group]]
            lead = args[0].shape[:-1]  # (batch, seq) for transformers
            if tuple(mask.shape) != tuple(lead[: mask.ndim]):
                raise ValueError(
                    f"token mask of shape {tuple(mask.shape)} does not fit the input of group {group!r} "
                    f"(shape {tuple(args[0].shape)})"
                )
            # A per-row mask (batch,) covers every token of its row.
            mask = mask.reshape(*mask.shape, *([1] * (len(lead) - mask.ndim))).expand(lead)
            w = mask.reshape(-1, 1).to(device=x.device, dtype=x.dtype)  # (tokens, 1), 0 for padding
            self._add(total, x * w, x)  # sum_n w_n x_n x_n^T without a host sync on the mask
            count += w.sum()

        return hook

    @staticmethod
    def _add(total: torch.Tensor, left: torch.Tensor, x: torch.Tensor) -> None:
        # The product in the GEMM's dtype, then one d^2 add into the (wider) running sum.
        if left.dtype == total.dtype:
            total.addmm_(left.T, x)
        else:
            total += left.T @ x

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Collect inside this block (hooks are removed on exit, errors included)."""
        handles = [m.register_forward_pre_hook(self._hook(g)) for g, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def token_mask(self, mask: torch.Tensor | Mapping[str, torch.Tensor] | None) -> Iterator[None]:
        """Weight the tokens of the forward passes in this block by `mask` (0 = padding), or by each group's
        side's mask."""
        self._mask = mask
        try:
            yield
        finally:
            self._mask = None

    def local_covariance(self, group: str) -> torch.Tensor:
        """This rank's own covariance of `group` (no collective), float64."""
        total, count = self.sums[group], self.counts[group]
        return total.double() / count.double()

    # --------------------------------------------------------------- Stateful
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The partial sums, so an interrupted pass can resume."""
        state = {f"{g}.sum": s for g, s in self.sums.items()}
        state.update({f"{g}.count": c for g, c in self.counts.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore partial sums saved by `state_dict`."""
        self.reset()
        for key, value in state.items():
            group, _, kind = key.rpartition(".")
            if group not in self.dims or kind not in ("sum", "count"):
                raise ValueError(f"unknown covariance state entry {key!r}")
            (self.sums if kind == "sum" else self.counts)[group] = value.clone()

    # --------------------------------------------------------------- reduction
    def _local(self, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every group's local sum and the stacked token counts, on `device`.

        A rank that saw no token of a group still allocates zero sums for it, so
        it takes part in every collective.
        """
        sums = {g: self._buffers(g, device)[0].to(device) for g in self.groups}
        counts = torch.stack([self.counts[g].to(device) for g in self.groups])
        return sums, counts

    def _triangles(self, sums: Mapping[str, torch.Tensor], groups: list[str]) -> list[dist.Segment]:
        return [dist.UpperTriangle(sums[g]) for g in groups]

    def _check_counts(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        for g, n in zip(self.groups, counts.tolist(), strict=True):
            if n <= 0:
                raise ValueError(f"input group {g!r} saw no tokens in the covariance pass")
        return dict(zip(self.groups, counts.double(), strict=True))

    def reduce_bytes(self, groups: list[str] | None = None) -> int:
        """Bytes one reduction of `groups` (default all) sends per rank: upper triangles and counts."""
        groups = self.groups if groups is None else groups
        return sum(traffic_bytes(self.dims[g], self.dtype.itemsize) for g in groups)

    def all_reduce(self) -> dict[str, torch.Tensor]:
        """Every group's covariance over all ranks' data, on every rank (float64).

        Collective: every rank calls it, with the same groups. One stream of
        buckets: the counts, then every group's upper triangle.
        """
        device = dist.collective_device()
        sums, counts = self._local(device)
        collectives = dist.sum_in_buckets_([dist.Flat(counts), *self._triangles(sums, self.groups)], self.bucket_bytes)
        self.last_reduction = {"bytes": self.reduce_bytes(), "collectives": collectives}
        totals = self._check_counts(counts)
        out = {g: mirror_(sums[g]).double().div_(totals[g]) for g in self.groups}
        self.reset()
        return out

    def reduce_to_owners(self, owners: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Covariances of the groups this rank owns (float64); other groups' sums are dropped.

        Collective: every rank calls it with the same `owners`. The counts are
        all-reduced first (one small collective: every rank must see an empty
        group, or only its owner would stop), then each owner's triangles are
        reduced to it in their own stream of buckets.
        """
        device = dist.collective_device()
        sums, counts = self._local(device)
        collectives = dist.sum_in_buckets_([dist.Flat(counts)], self.bucket_bytes)
        totals = self._check_counts(counts)
        rank = dist.get_rank()
        for owner in sorted(set(owners[g] for g in self.groups)):
            mine = [g for g in self.groups if owners[g] == owner]
            collectives += dist.sum_in_buckets_(self._triangles(sums, mine), self.bucket_bytes, dst=owner)
        self.last_reduction = {"bytes": self.reduce_bytes(), "collectives": collectives}
        out = {g: mirror_(sums[g]).double().div_(totals[g]) for g in self.groups if owners[g] == rank}
        self.reset()
        return out


def restrict_mask(
    mask: torch.Tensor | Mapping[str, torch.Tensor], keep: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """A token mask (or masks by side) with the rows where `keep` (batch,) is false set to 0."""
    if isinstance(mask, Mapping):
        return {side: restrict_mask(m, keep) for side, m in mask.items()}  # type: ignore[misc]
    return mask * keep.to(device=mask.device, dtype=mask.dtype).reshape(-1, *([1] * (mask.ndim - 1)))


class TokenBudget:
    """Which samples of a covariance pass count: the first ones, in the pass's order, whose tokens fit
    `max_tokens` (whole samples; the first sample always counts, so a pass is never empty).

    `take` is called once per batch on every rank with its rows' token counts (0 for padding rows): one
    all-gather of the counts. A global batch holds positions rank after rank (data/plan.py: rank r reads
    the run [k g + r b, k g + (r + 1) b)), so the gathered counts, flattened, are in the data's order and
    every rank picks the same samples whatever the world size. Collective.
    """

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"inflora.covariance_max_tokens must be >= 1 or null, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.used = 0  # tokens of the samples taken so far (all ranks)
        self.samples = 0  # samples taken so far (all ranks)
        self.full = False  # a sample did not fit: nothing after it is taken

    def take(self, tokens: torch.Tensor) -> torch.Tensor:
        """A bool mask (batch,) of this rank's rows that count. Collective (one all-gather)."""
        table = dist.all_gather(tokens.to(device=dist.collective_device(), dtype=torch.float64)).cpu()
        keep = torch.zeros(table.numel(), dtype=torch.bool)
        for i, n in enumerate(table.reshape(-1).tolist()):
            if self.full:
                break
            if n == 0:
                continue  # a padding row
            if self.samples and self.used + n > self.max_tokens:
                self.full = True
                break
            keep[i] = True
            self.used += int(n)
            self.samples += 1
        return keep.view(table.shape)[dist.get_rank()].to(tokens.device)


def assign_owners(dims: Mapping[str, int], world_size: int) -> dict[str, int]:
    """Give each group an owner rank so the ranks' summed d^3 decomposition costs are balanced.

    Greedy longest-processing-time: biggest groups first, each to the least
    loaded rank (ties: lowest rank). Deterministic, so every rank agrees.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    owners = {}
    for group in sorted(dims, key=lambda g: (-dims[g], g)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[group] = rank
        load[rank] += dims[group] ** 3
    return owners
