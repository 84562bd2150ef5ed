"""Put InfLoRA branches into a model: match target modules, wrap them, freeze the rest.

Targets follow PEFT: a pattern matches a module whose full name equals it,
ends in `.pattern`, or fully matches it as a regular expression. Matched
siblings that read the same input (q/k/v of one attention block, gate/up of
one MLP) form one *input group*: one covariance, one A_t for all of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from inflora_dist.layer import InfLoRALinear, supported_base

#: Sibling module names that read the same tensor in common transformers families.
DEFAULT_SHARED_INPUTS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Qwen2, Mistral; ViT and DINOv2 in transformers >= 5
    ("query", "key", "value"),  # ViT, DINOv2, BERT in transformers < 5
    ("gate_proj", "up_proj"),  # Llama-style gated MLP
    # T5: q/k/v of self-attention read the block's input; the cross-attention's k and v read the encoder's
    # output, its q the decoder's (a group of its own); wi_0/wi_1 of the gated FFN (T5 v1.1, flan-t5).
    ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v"),
    ("EncDecAttention.k", "EncDecAttention.v"),
    ("DenseReluDense.wi_0", "DenseReluDense.wi_1"),
)


@dataclass
class InjectionReport:
    """What `inject_inflora` did.

    `layers` maps each wrapped module's name to its InfLoRALinear; `groups` maps
    each input group to the names of its members (in model order) and `dims`
    to its input dimension d_in.
    """

    layers: dict[str, InfLoRALinear] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)

    def group_modules(self, group: str) -> list[InfLoRALinear]:
        """The wrapped layers of one input group."""
        return [self.layers[name] for name in self.groups[group]]


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers?|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The block number in a module name (`...layers.7.attn.k_proj` -> 7), as PEFT's layers_to_transform reads it."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def matches(name: str, patterns: Sequence[str]) -> bool:
    """PEFT-style target match: exact name, `.pattern` suffix, or full regex match."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            continue
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def _group_name(name: str, shared_inputs: Sequence[Sequence[str]], targets: set[str]) -> str:
    """`<prefix><member>+<member>...` for a module whose name ends in one of a sibling set's names (a name may
    carry its parent: `EncDecAttention.k`), listing the set's matched members; else the name itself."""
    for siblings in shared_inputs:
        for sibling in siblings:
            if name == sibling or name.endswith("." + sibling):
                prefix = name[: len(name) - len(sibling)]
                return prefix + "+".join(s for s in siblings if prefix + s in targets)
    return name


def inject_inflora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    num_tasks: int,
    fold: str = "merge",
    trainable: Sequence[str] = (),
    shared_inputs: Sequence[Sequence[str]] = DEFAULT_SHARED_INPUTS,
    adapter_dtype: torch.dtype = torch.float32,
    layers_to_transform: Sequence[int] | None = None,
    train_A: bool = False,
    scaling: float = 1.0,
) -> InjectionReport:
    """Wrap every module matching `targets` in an InfLoRALinear and freeze all other weights.

    `layers_to_transform` keeps only matches inside those block numbers (PEFT's
    option: adapters on the top blocks only shorten the backward pass).
    `train_A` and `scaling` are the layers' options (layer.py: a trainable A per
    task, O-LoRA's; a scale on every branch).
    Parameters whose names match `trainable` (e.g. a classifier head) stay
    trainable. Raises ValueError naming the patterns when nothing matches, and
    TypeError naming the module when a match is not a linear layer.
    """
    if not targets:
        raise ValueError("targets is empty: name the linear layers to adapt (e.g. ['k_proj', 'v_proj'])")
    found = [name for name, _ in model.named_modules() if name and matches(name, targets)]
    if layers_to_transform is not None:
        keep = set(layers_to_transform)
        found = [name for name in found if layer_index(name) in keep]
    found = [n for n in found if not isinstance(model.get_submodule(n), InfLoRALinear)]
    if not found:
        linear = [n for n, m in model.named_modules() if supported_base(m)]
        where = f" in blocks {sorted(layers_to_transform)}" if layers_to_transform is not None else ""
        raise ValueError(
            f"target patterns {list(targets)} matched no module{where}; linear layers include {linear[:8]}"
        )
    for name in found:
        module = model.get_submodule(name)
        if not supported_base(module):
            raise TypeError(f"target {name!r} is a {type(module).__name__}, not nn.Linear or Conv1D")

    for p in model.parameters():
        p.requires_grad_(False)
    report = InjectionReport()
    target_set = set(found)
    for name in found:
        layer = InfLoRALinear(
            model.get_submodule(name), rank, num_tasks, fold=fold, adapter_dtype=adapter_dtype, train_A=train_A,
            scaling=scaling,
        )  # fmt: skip
        _set_submodule(model, name, layer)
        report.layers[name] = layer
        group = _group_name(name, shared_inputs, target_set)
        report.groups.setdefault(group, []).append(name)
        report.dims[group] = layer.in_features
    for group, names in report.groups.items():
        dims = {report.layers[n].in_features for n in names}
        if len(dims) != 1:
            raise ValueError(f"input group {group!r} mixes input dimensions {sorted(dims)}")
    if trainable:
        for name, p in model.named_parameters():
            parts = name.split(".")
            # A parameter is trainable when it or any module above it matches.
            if any(matches(".".join(parts[:i]), trainable) for i in range(1, len(parts) + 1)):
                p.requires_grad_(True)
    return report


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (whole sizes of ZeRO-3 partitioned parameters)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trainable in sizes if trainable), sum(n for n, _ in sizes)
