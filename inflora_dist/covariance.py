"""The distributed covariance aggregator.

For each input group, forward pre-hooks sum x x^T over tokens and count the
tokens (padding masked out). Across processes the sums and counts are added
exactly (torch.distributed SUM), so C = sum / count is what one process would
compute over the union of the data, however it is split:

  * all-reduce mode: every rank gets every group's covariance;
  * owner mode: each group is reduced to one owner rank (groups assigned to
    balance the d^3 cost of decomposing them), so only the owner ever holds the
    reduced covariance; the caller broadcasts what the owner derives from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from inflora_dist import dist


def default_accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU (cheap there, and exact enough to match across any split); float32 on accelerators."""
    return torch.float64 if device.type == "cpu" else torch.float32


class CovarianceCollector:
    """Sums x x^T and token counts per input group via forward pre-hooks.

    `modules` maps each group to one module that reads the group's input (one
    hook per group is enough: its members read the same tensor). Use
    `capturing()` around the pass and `token_mask(mask)` around each batch whose
    tokens carry padding: `mask` has the shape of the input without its last
    dimension (e.g. (batch, seq)), or a leading part of it ((batch,) weights
    whole rows); 1 for real tokens, 0 for padding.
    """

    def __init__(self, modules: Mapping[str, nn.Module], dims: Mapping[str, int], dtype: torch.dtype | None = None):
        if set(modules) != set(dims):
            raise ValueError(f"modules and dims name different groups: {sorted(set(modules) ^ set(dims))}")
        self.modules = dict(modules)
        self.dims = dict(dims)
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}  # (d, d), allocated on first use
        self.counts: dict[str, torch.Tensor] = {}  # scalar, same dtype as the sums
        self._mask: torch.Tensor | None = None

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
            dtype = self.dtype or default_accumulation_dtype(device)
            d = self.dims[group]
            self.sums[group] = torch.zeros(d, d, dtype=dtype, device=device)
            self.counts[group] = torch.zeros((), dtype=dtype, device=device)
        return self.sums[group], self.counts[group]

    def _hook(self, group: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            total, count = self._buffers(group, x.device)
            x = x.reshape(-1, x.shape[-1]).to(total.dtype)  # (tokens, d)
            if self._mask is None:
                total.addmm_(x.T, x)
                count += x.shape[0]
                return
            mask = self._mask
            lead = args[0].shape[:-1]  # (batch, seq) for transformers
            if tuple(mask.shape) != tuple(lead[: mask.ndim]):
                raise ValueError(
                    f"token mask of shape {tuple(mask.shape)} does not fit the input of group {group!r} "
                    f"(shape {tuple(args[0].shape)})"
                )
            # A per-row mask (batch,) covers every token of its row.
            mask = mask.reshape(*mask.shape, *([1] * (len(lead) - mask.ndim))).expand(lead)
            w = mask.reshape(-1, 1).to(device=x.device, dtype=x.dtype)  # (tokens, 1), 0 for padding
            total.addmm_((x * w).T, x)  # sum_n w_n x_n x_n^T without a host sync on the mask
            count += w.sum()

        return hook

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
    def token_mask(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Weight the tokens of the forward passes in this block by `mask` (0 = padding)."""
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
    def _reduced_counts(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Total token count of every group, on every rank. Collective (one all-reduce).

        A rank that saw no token of a group still allocates zero sums for it on
        `device`, so it takes part in every collective.
        """
        counts = torch.stack([self._buffers(g, device)[1].to(device) for g in self.groups])
        dist.all_reduce_sum_(counts)
        for g, n in zip(self.groups, counts.tolist(), strict=True):
            if n <= 0:
                raise ValueError(f"input group {g!r} saw no tokens in the covariance pass")
        return dict(zip(self.groups, counts.double(), strict=True))

    def all_reduce(self) -> dict[str, torch.Tensor]:
        """Every group's covariance over all ranks' data, on every rank (float64).

        Collective: every rank calls it, with the same groups.
        """
        device = dist.collective_device()
        counts = self._reduced_counts(device)
        out = {}
        for g in self.groups:
            total = dist.all_reduce_sum_(self._buffers(g, device)[0].to(device))  # collective
            out[g] = total.double() / counts[g]
        self.reset()
        return out

    def reduce_to_owners(self, owners: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Covariances of the groups this rank owns (float64); other groups' sums are dropped.

        Collective: every rank calls it with the same `owners`.
        """
        device = dist.collective_device()
        counts = self._reduced_counts(device)
        rank = dist.get_rank()
        out = {}
        for g in self.groups:
            total = dist.reduce_sum_(self._buffers(g, device)[0].to(device), dst=owners[g])  # collective
            if owners[g] == rank:
                out[g] = total.double() / counts[g]
        self.reset()
        return out


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
