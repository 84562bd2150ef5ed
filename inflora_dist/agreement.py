"""Ranks that agree: fingerprints of what must be equal on every rank, compared before heavy work.

A multi-node job can silently differ between nodes: one node's stale copy of
the shard index, another model directory, another library version. Every
collective would still run, and the covariances, A and memories would be wrong
with no error. Before each task the trainer hashes each such item on every
rank (`check_ranks_agree`), all-gathers the digests in one collective and, on a
mismatch, raises `RanksDisagree` on every rank (they all see the same table),
naming each differing item and the ranks on each side, and, for items that are
values rather than digests (the resolved config, the task specs, versions),
each differing key with its value on each side (`train.lr: 0.005 (rank 0) vs
0.01 (rank 1)`): on a mismatch only, the differing values themselves are
all-gathered (a few KB).

The items are named and ordered by the caller; every rank must pass the same
names (they come from code, not data). Values are hashed with SHA-256 and the
first 8 bytes travel (as int64), so only 8 bytes per item cross the network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from inflora_dist import dist
from inflora_dist.config import flatten
from inflora_dist.errors import UserError
from inflora_dist.inject import InjectionReport


class RanksDisagree(UserError, RuntimeError):
    """Some rank's fingerprint of a must-be-equal item differs from another's."""


def digest(value: Any) -> str:
    """SHA-256 hex digest of bytes, a string, or any JSON-serialisable value (keys sorted)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over the names, dtypes, shapes and raw bytes of tensors (in the given order)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.hexdigest()


def frozen_weights(report: InjectionReport) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the targeted layers' pre-trained weights, layer by layer, each gathered while it is
    read under ZeRO-3 (never the whole model at once). Collective under ZeRO-3: consume it on every rank."""
    for name, layer in report.layers.items():
        params = list(layer.base_layer.named_parameters())
        with dist.gathered_params(p for _, p in params):
            for k, p in params:
                yield f"{name}.{k}", p


def _as_int64(hex_digest: str) -> int:
    return int.from_bytes(bytes.fromhex(hex_digest[:16]), "big", signed=True)


def check_ranks_agree(items: Mapping[str, Any], context: str) -> None:
    """All-gather the digests of `items` and raise RanksDisagree on every rank if any differs. Collective.

    `items` maps each item's name to its value (hashed with `digest`; a value
    that already is a 64-hex digest is used as is). `context` says where the
    check runs (e.g. "before stage 1 (task1)"). The message names each
    differing item with the ranks on each side, and this rank's own value when
    it is short (a version string), so each rank's traceback shows its side.
    """
    names = list(items)
    hexes = [v if _is_digest(v) else digest(v) for v in items.values()]
    local = torch.tensor([_as_int64(h) for h in hexes], dtype=torch.int64, device=dist.collective_device())
    table = dist.all_gather(local).cpu()  # (world, items), collective
    rank = dist.get_rank()
    problems, differing = [], []
    for i, name in enumerate(names):
        column = table[:, i].tolist()
        if len(set(column)) == 1:
            continue
        differing.append(name)
        sides: dict[int, list[int]] = {}
        for r, value in enumerate(column):
            sides.setdefault(value, []).append(r)
        described = "; ".join(
            f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}: {v & (2**64 - 1):016x}" for v, r in sides.items()
        )
        value = items[name]
        own = value if isinstance(value, str) and len(value) <= 80 and not _is_digest(value) else hexes[i][:16]
        problems.append(f"{name} differs: {described} (this rank, {rank}, has {own})")
    if problems:
        problems += _value_differences({n: items[n] for n in differing if not _is_digest(items[n])})
        raise RanksDisagree(
            f"the ranks disagree {context}; every rank must read the same config, data and model:\n  "
            + "\n  ".join(problems)
        )


#: At most this many differing keys are listed per item (then a count).
_MAX_KEYS = 12


def _value_differences(items: Mapping[str, Any]) -> list[str]:
    """'<item>: <key>: <value> (rank 0) vs <value> (rank 1)' for every differing key of the items' values,
    gathered from every rank. Collective: every rank passes the same item names."""
    lines = []
    gathered = dist.all_gather_json(list(items.values()))  # collective
    for i, name in enumerate(items):
        leaves = [flatten(per_rank[i], lists=True) for per_rank in gathered]
        keys = sorted(set().union(*leaves))
        diffs = []
        for key in keys:
            sides: dict[str, list[int]] = {}
            for rank, leaf in enumerate(leaves):
                text = json.dumps(leaf.get(key, "(missing)"), default=str)
                sides.setdefault(text[:60] + ("..." if len(text) > 60 else ""), []).append(rank)
            if len(sides) > 1:
                described = (f"{v} (rank{'s' * (len(r) > 1)} {', '.join(map(str, r))})" for v, r in sides.items())
                diffs.append(f"{key}: " + " vs ".join(described))
        more = [f"... and {len(diffs) - _MAX_KEYS} more keys"] if len(diffs) > _MAX_KEYS else []
        lines += [f"{name}: {d}" for d in diffs[:_MAX_KEYS] + more]
    return lines


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
