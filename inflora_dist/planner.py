"""Plan the covariance pass under a per-rank memory budget, and run it in several passes.

At LLM scale the covariance sums do not fit at once: LLaMA-2-7B adapted on all
of q/k/v/o/gate/up/down has 128 input groups (per layer three of d=4096 and one
of d=11008), and one float32 sum of 11008^2 is 484,704,256 bytes (485 MB).
Every rank runs the hooks of every group collected in a pass (each sees its own
share of the data), so the budget bounds which groups one pass over the data
may collect. `plan_covariance` splits the groups into passes that fit;
`collect_in_passes` runs them::

    plan = plan_covariance(report.dims, world_size, bytes_per_element=4, max_bytes_per_rank=40 * 2**30,
                           reduce="owner")
    if dist.is_main_process():
        print(plan.describe())
    covs = collect_in_passes(inflora, plan, run_pass)   # run_pass(collector): one pass over the data

Memory accounting (per rank, per pass, in bytes; b = `bytes_per_element` of
the sums, d = a group's input dimension). During the pass and until its reduce
returns, a rank holds

  * the local sums of ALL groups of the pass: (d*d + 1) * b each (the sum and
    its token count), whatever the reduce mode;
  * the reduced covariance of each group of the pass it keeps: d*d * 8 each
    (always float64). It keeps every group in all-reduce mode and the groups it
    owns (`assign_owners` over ALL groups, as InfLoRA does) in owner mode;
  * when the sums are not float64 (b != 8), one float64 temporary of d*d * 8
    for the largest group it keeps in the pass (`total.double() / count` makes
    a float64 copy, then the quotient);
  * with `keep_results=True` (what `collect_in_passes` does without
    `on_pass`), the reduced covariances it kept from earlier passes;
  * with more than one rank, one reduction bucket: min(bucket_bytes, the
    pass's traffic), the traffic being the upper triangles and counts,
    (d(d+1)/2 + 1) * b per group (`dist.sum_in_buckets_`; not counted: its
    index temporaries of at most 2^20 int64 values, 24 MiB).

With float64 sums the reduced covariance is the local sum's own memory,
mirrored and divided in place, so counting both is an upper bound that also
covers the mirror's d*d temporary.

The peak of a pass is that sum; it is an upper bound on what the collector
allocates (the order of allocation inside the reduce only lowers it). Not
counted: the model, activations, the few scalars of the count all-reduce,
communication buffers of the backend, a copy made when the sums live on
another device than the collectives (GPU sums under gloo), and whatever
`on_pass` or the caller allocates from the covariances (e.g. SVD workspace).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from inflora_dist import dist
from inflora_dist.covariance import CovarianceCollector, assign_owners, traffic_bytes

logger = logging.getLogger(__name__)

REDUCE_MODES = ("all_reduce", "owner")
#: The reduced covariances are always float64 (see CovarianceCollector.all_reduce / reduce_to_owners).
RESULT_BYTES_PER_ELEMENT = 8


def sum_bytes(d: int, bytes_per_element: int) -> int:
    """Bytes of one group's local sum and token count: (d*d + 1) * bytes_per_element."""
    return (d * d + 1) * bytes_per_element


def result_bytes(d: int) -> int:
    """Bytes of one reduced (float64) covariance: d*d * 8."""
    return d * d * RESULT_BYTES_PER_ELEMENT


def _mb(n: int) -> str:
    return f"{n / 1e6:,.3f}"


@dataclass
class CovariancePlan:
    """Which groups each covariance pass collects, who owns them, and what each rank holds at its peak.

    `passes[p]` lists the groups of pass p (largest first); `owners` maps every
    group to its owner rank in owner mode (None in all-reduce mode);
    `bytes_per_rank_per_pass[p][r]` is rank r's peak during pass p (see the
    module docstring for what is counted). Every rank builds the same plan from
    the same arguments.
    """

    dims: dict[str, int]
    world_size: int
    reduce: str
    bytes_per_element: int
    max_bytes_per_rank: int | None
    keep_results: bool
    bucket_bytes: int = dist.DEFAULT_BUCKET_BYTES
    passes: list[list[str]] = field(default_factory=list)
    owners: dict[str, int] | None = None
    bytes_per_rank_per_pass: list[list[int]] = field(default_factory=list)

    @property
    def num_passes(self) -> int:
        return len(self.passes)

    @property
    def peak_bytes_per_rank(self) -> list[int]:
        """Each rank's peak over all passes."""
        if not self.bytes_per_rank_per_pass:
            return [0] * self.world_size
        return [max(p[r] for p in self.bytes_per_rank_per_pass) for r in range(self.world_size)]

    @property
    def peak_bytes(self) -> int:
        """The largest peak of any rank in any pass."""
        return max(self.peak_bytes_per_rank)

    def kept_by(self, rank: int, groups: list[str] | None = None) -> list[str]:
        """The groups (of `groups`, default all) whose reduced covariance `rank` holds after their pass."""
        groups = sorted(self.dims) if groups is None else groups
        if self.owners is None:
            return list(groups)
        return [g for g in groups if self.owners[g] == rank]

    def total_sum_bytes(self) -> int:
        """Bytes of all groups' local sums and counts (what one pass over every group holds on each rank)."""
        return sum(sum_bytes(d, self.bytes_per_element) for d in self.dims.values())

    def describe(self) -> str:
        """A table for the log: each group's pass, d_in, sum MB and owner; each rank's peak per pass vs the budget."""
        budget = (
            f"{_mb(self.max_bytes_per_rank)} MB ({self.max_bytes_per_rank:,} bytes)"
            if self.max_bytes_per_rank is not None
            else "none"
        )
        lines = [
            f"covariance plan: {len(self.dims)} input groups in {self.num_passes} pass(es), reduce={self.reduce} "
            f"over {self.world_size} rank(s), sums of {self.bytes_per_element} bytes/element, "
            f"reduced covariances of earlier passes {'kept' if self.keep_results else 'consumed per pass'}",
            f"budget per rank: {budget}",
            f"all local sums at once: {_mb(self.total_sum_bytes())} MB per rank",
        ]
        width = max([len("group"), *(len(g) for g in self.dims)])
        lines.append(f"{'pass':>4}  {'group':<{width}}  {'d_in':>6}  {'sum MB':>12}  {'owner':>5}")
        for p, groups in enumerate(self.passes):
            for g in groups:
                d = self.dims[g]
                owner = "all" if self.owners is None else str(self.owners[g])
                lines.append(
                    f"{p:>4}  {g:<{width}}  {d:>6}  {_mb(sum_bytes(d, self.bytes_per_element)):>12}  {owner:>5}"
                )
        lines.append("peak MB per rank (local sums of the pass + reduced copies held):")
        header = "".join(f"  {'rank ' + str(r):>12}" for r in range(self.world_size))
        lines.append(f"{'pass':>4}{header}")
        for p, row in enumerate(self.bytes_per_rank_per_pass):
            lines.append(f"{p:>4}" + "".join(f"  {_mb(b):>12}" for b in row))
        lines.append(f"{'max':>4}" + "".join(f"  {_mb(b):>12}" for b in self.peak_bytes_per_rank))
        if self.max_bytes_per_rank is not None and self.dims:
            lines.append(
                f"peak {_mb(self.peak_bytes)} MB of budget {_mb(self.max_bytes_per_rank)} MB "
                f"({100 * self.peak_bytes / self.max_bytes_per_rank:.1f}%)"
            )
        return "\n".join(lines)


def plan_covariance(
    dims: Mapping[str, int],
    world_size: int,
    bytes_per_element: int = 8,
    max_bytes_per_rank: int | None = None,
    reduce: str = "owner",
    keep_results: bool = True,
    bucket_bytes: int = dist.DEFAULT_BUCKET_BYTES,
) -> CovariancePlan:
    """Split the input groups into covariance passes whose per-rank peak fits `max_bytes_per_rank`.

    Groups are taken largest first (ties by name) and packed into consecutive
    passes, a new pass starting when the next group would push some rank over
    the budget (next-fit decreasing: deterministic, so every rank builds the
    same plan; with the few distinct sizes of a transformer it is within a
    pass of the optimum). Without a budget everything is one pass. Owners come
    from `assign_owners(dims, world_size)` over all groups, the assignment
    InfLoRA(reduce="owner") uses. `keep_results=False` is for callers that
    consume each pass's covariances before the next (`collect_in_passes` with
    `on_pass`); then earlier passes' covariances are not counted.

    Raises ValueError naming the group, its bytes and the budget when one group
    alone does not fit.
    """
    if reduce not in REDUCE_MODES:
        raise ValueError(f"reduce must be one of {REDUCE_MODES}, got {reduce!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if bytes_per_element < 1:
        raise ValueError(f"bytes_per_element must be >= 1, got {bytes_per_element}")
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    if max_bytes_per_rank is not None and max_bytes_per_rank < 1:
        raise ValueError(f"max_bytes_per_rank must be positive or None, got {max_bytes_per_rank}")
    dims = {g: int(d) for g, d in dims.items()}
    for g, d in dims.items():
        if d < 1:
            raise ValueError(f"input group {g!r} has dimension {d}")
    plan = CovariancePlan(
        dims=dims,
        world_size=world_size,
        reduce=reduce,
        bytes_per_element=bytes_per_element,
        max_bytes_per_rank=max_bytes_per_rank,
        keep_results=keep_results,
        bucket_bytes=bucket_bytes,
        owners=assign_owners(dims, world_size) if reduce == "owner" else None,
    )
    b = bytes_per_element

    def peaks(groups: list[str], carried: list[int]) -> list[int]:
        local = sum(sum_bytes(dims[g], b) for g in groups)
        if world_size > 1:
            local += min(bucket_bytes, sum(traffic_bytes(dims[g], b) for g in groups))
        out = []
        for r in range(world_size):
            kept = [result_bytes(dims[g]) for g in plan.kept_by(r, groups)]
            temporary = max(kept, default=0) if b != RESULT_BYTES_PER_ELEMENT else 0
            out.append(carried[r] + local + sum(kept) + temporary)
        return out

    def fits(row: list[int]) -> bool:
        return max_bytes_per_rank is None or max(row) <= max_bytes_per_rank

    def close(groups: list[str], carried: list[int]) -> list[int]:
        plan.passes.append(groups)
        plan.bytes_per_rank_per_pass.append(peaks(groups, carried))
        if not keep_results:
            return carried
        return [carried[r] + sum(result_bytes(dims[g]) for g in plan.kept_by(r, groups)) for r in range(world_size)]

    carried = [0] * world_size
    current: list[str] = []
    for g in sorted(dims, key=lambda g: (-dims[g], g)):
        if fits(peaks([*current, g], carried)):
            current.append(g)
            continue
        if current:
            carried = close(current, carried)
            current = []
        alone = peaks([g], carried)
        if not fits(alone):
            rank = max(range(world_size), key=lambda r: alone[r])
            held = f"; {_mb(carried[rank])} MB of it are covariances kept from earlier passes" if carried[rank] else ""
            raise ValueError(
                f"input group {g!r} (d_in={dims[g]}) does not fit max_bytes_per_rank={max_bytes_per_rank:,} bytes "
                f"({_mb(max_bytes_per_rank)} MB): its local sum alone is {sum_bytes(dims[g], b):,} bytes "
                f"({_mb(sum_bytes(dims[g], b))} MB) and rank {rank} would hold {alone[rank]:,} bytes "
                f"({_mb(alone[rank])} MB) with its reduced float64 copy{held}"
            )
        current = [g]
    if current:
        close(current, carried)
    return plan


def plan_for(inflora: object, max_bytes_per_rank: int | None, keep_results: bool = True) -> CovariancePlan:
    """The plan for an InfLoRA object on this process group (its collector's dtype and bucket size)."""
    collector = inflora.collector
    return plan_covariance(
        collector.dims,
        dist.get_world_size(),
        bytes_per_element=collector.dtype.itemsize,
        max_bytes_per_rank=max_bytes_per_rank,
        reduce=inflora.reduce,
        keep_results=keep_results,
        bucket_bytes=collector.bucket_bytes,
    )


def collect_in_passes(
    source: object,
    plan: CovariancePlan,
    run_pass: Callable[[CovarianceCollector], None],
    on_pass: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Collect and reduce the covariances pass by pass, as `plan` says. Collective: every rank calls it.

    `source` is an InfLoRA object (its `collector` gives the modules, dims and
    accumulation dtype; its `reduce` and `owners` must agree with the plan) or a
    CovarianceCollector. For each pass a fresh CovarianceCollector over the
    pass's groups is made and `run_pass(collector)` is called inside its
    `capturing()` and `torch.no_grad()`: it must run one full forward pass over
    this rank's share of the data and wrap every padded batch in
    `collector.token_mask(mask)` OF THE COLLECTOR IT IS GIVEN (not
    `inflora.collector`, which does not capture here), e.g.::

        def run_pass(collector):
            for ids, mask in loader:
                with collector.token_mask(mask):
                    model(input_ids=ids, attention_mask=mask)

    The pass's sums are then reduced (all-reduce or to the plan's owners) and
    dropped before the next pass. This rank keeps every group's covariance in
    all-reduce mode and its owned groups' in owner mode (float64).

    Without `on_pass` the kept covariances of all passes are returned,
    {group: (d, d) float64} (the plan must have keep_results=True). With it,
    `on_pass(pass_index, covariances)` receives each pass's kept covariances
    right after its reduce and nothing is kept (returns {}): to design A pass
    by pass without holding every covariance at once (plan with
    keep_results=False). `on_pass` runs on every rank, also one that kept no
    group of the pass; it may run collectives (the same on every rank).
    """
    collector = getattr(source, "collector", source)
    if not isinstance(collector, CovarianceCollector):
        raise TypeError(f"source must be an InfLoRA object or a CovarianceCollector, got {type(source).__name__}")
    if collector.dims != plan.dims:
        raise ValueError(
            f"the plan and the collector differ in groups or dimensions: "
            f"{sorted(set(collector.dims.items()) ^ set(plan.dims.items()))}"
        )
    world_size = dist.get_world_size()
    if world_size != plan.world_size:
        raise ValueError(f"the plan is for {plan.world_size} rank(s), this process group has {world_size}")
    reduce = getattr(source, "reduce", None)
    if reduce is not None and reduce != plan.reduce:
        raise ValueError(f"the plan reduces with {plan.reduce!r} but InfLoRA with {reduce!r}")
    owners = getattr(source, "owners", None)
    if plan.owners is not None and owners is not None and owners != plan.owners:
        raise ValueError("the plan's owners differ from InfLoRA's (planned for another world size?)")
    if on_pass is None and not plan.keep_results:
        raise ValueError("the plan assumes each pass is consumed (keep_results=False): pass on_pass")

    kept: dict[str, torch.Tensor] = {}
    for p, groups in enumerate(plan.passes):
        sub = CovarianceCollector(
            {g: collector.modules[g] for g in groups},
            {g: collector.dims[g] for g in groups},
            dtype=collector.dtype,
            gemm_dtype=collector.gemm_dtype,
            bucket_bytes=collector.bucket_bytes,
            sides=collector.sides,
        )
        if dist.is_main_process():
            logger.info("covariance pass %d/%d: %d group(s)", p + 1, plan.num_passes, len(groups))
        with torch.no_grad(), sub.capturing():
            run_pass(sub)
        covs = sub.all_reduce() if plan.owners is None else sub.reduce_to_owners(plan.owners)  # collective
        del sub  # its sums were dropped by the reduce
        if on_pass is not None:
            on_pass(p, covs)
        else:
            kept.update(covs)
        del covs
    return kept
