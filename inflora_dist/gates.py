"""GainLoRA's gates (Liang, Chen & Li, NeurIPS 2025, arXiv:2505.15424): pure functions and the gate networks.

Every task i owns a small gate network g_i and a key k_i. An input's gate value for task i is

    a_i(x) = |2 sigmoid(4 cos(g_i(xbar), k_i)) - 1|            in [0, 1)

with xbar the mean of the input's token embeddings (the prompt's tokens; padding masked), and every adapted
layer adds sum_i a_i(x) B_i A_i x. A new task's gate starts as the previous task's; its key and the updates of
its gate are kept out of the old tasks' subspaces (methods/gainlora.py), so that old inputs get a_t(x) ~ 0 and
the new branch leaves them alone.

The reference: `2unju/gainlora` at 0263e48 (the authors' LLaMA code; `liangyanshuo/gainlora` holds the T5 one):
  * gate networks: `src/llama_gainlora_inflora.py` L743-748 (Linear(d, h) -> Linear(h, d) -> SiLU, no bias) and
    `src/t5_gainlora_inflora.py` L1061-1065 (Linear(d, h) -> SiLU -> Linear(h, d) -> SiLU, no bias); the
    second linear's input is the "hidden" activation whose subspace protects the gate (`medium`, L948 / L1301);
  * gate value `cal_attention`: L837-864 / L1197-1226 (cosine of the normalised vectors, `abs(sigmoid(4 s) * 2
    - 1)`);
  * gate input: L947 / L1299, the embeddings of the prompt (`input_ids_wo_label`; T5: the encoder's input) with
    padding zeroed, then `.mean(dim=1)`. That divides by the padded length, so a sample's gate depends on the
    longest prompt of its batch (and on the batch size and world size). Here the sum is divided by the sample's
    own count of prompt tokens: the masked mean the paper describes, the same in any batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: The gate networks by architecture: the reference's per model family.
GATE_ARCHITECTURES = ("llama", "t5")


def masked_mean(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, d) mean of each row's embeddings (batch, tokens, d) over its tokens where `mask` (batch, tokens) is
    nonzero, in float32; a row without tokens gets zeros."""
    m = mask.to(device=embeddings.device, dtype=torch.float32).unsqueeze(-1)
    total = (embeddings.float() * m).sum(dim=1)
    return total / m.sum(dim=1).clamp_min(1.0)


def gate_values(outputs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """|2 sigmoid(4 cos(g_i(x), k_i)) - 1| (the reference's `cal_attention`): `outputs` (batch, tasks, d) are the
    gate networks' outputs, `keys` (tasks, d); returns (batch, tasks)."""
    cosine = (F.normalize(outputs, dim=-1) * F.normalize(keys, dim=-1)).sum(dim=-1)
    return (2.0 * torch.sigmoid(4.0 * cosine) - 1.0).abs()


def project_update(new: torch.Tensor, old: torch.Tensor, projector: torch.Tensor | None) -> torch.Tensor:
    """old + (new - old)(I - P): an update with its component in the protected input subspace (P = M M^T, acting
    on the last dimension) taken out (the reference's trainer, `cl_trainer_gainlora_inflora_llama.py`
    L1309-1316). `projector` None: nothing is protected, `new` as it is."""
    if projector is None:
        return new
    delta = (new - old).double()
    return (old.double() + delta - delta @ projector).to(new.dtype)


class GateNetwork(nn.Module):
    """One task's gate network g_i: d -> hidden -> d, no biases, by the reference's architecture per family.

    `hidden_input` is the second linear's input (what the reference calls `medium`): with `output` (an identity)
    it gives the covariance hooks the three activations whose subspaces protect the gates.
    """

    def __init__(self, dim: int, hidden: int, architecture: str) -> None:
        super().__init__()
        if architecture not in GATE_ARCHITECTURES:
            raise ValueError(f"gate architecture must be one of {list(GATE_ARCHITECTURES)}, got {architecture!r}")
        self.architecture = architecture
        self.input = nn.Linear(dim, hidden, bias=False)
        self.hidden = nn.Linear(hidden, dim, bias=False)
        self.output = nn.Identity()  # a module whose input is the gate's output, for a covariance hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        medium = self.input(x)
        if self.architecture == "t5":
            medium = F.silu(medium)
        return self.output(F.silu(self.hidden(medium)))


class TaskGates(nn.Module):
    """The gates and keys of every task slot of a run: `gates[i]` (GateNetwork) and `keys[i]` (d,), float32.

    Allocated for all tasks up front, like the branches (layer.py); task i's gate value is computed only once it
    has started (`values(xbar, tasks)`).
    """

    def __init__(self, dim: int, hidden: int, num_tasks: int, architecture: str, seed: int) -> None:
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"gainlora.gate_hidden must be an integer >= 1, got {hidden!r}")
        self.gates = nn.ModuleList(GateNetwork(dim, hidden, architecture) for _ in range(num_tasks))
        self.keys = nn.ParameterList(nn.Parameter(torch.empty(dim)) for _ in range(num_tasks))
        with torch.no_grad():  # each slot from its own seeded generator: the same on every rank, at any run length
            for t, gate in enumerate(self.gates):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + t)
                for linear in (gate.input, gate.hidden):  # nn.Linear's own init
                    bound = linear.in_features**-0.5
                    linear.weight.uniform_(-bound, bound, generator=generator)
                # The reference draws each key uniform(-1, 1) (L739-740); the method projects and rescales it.
                self.keys[t].uniform_(-1.0, 1.0, generator=generator)
        self.dim, self.hidden_dim, self.architecture = dim, hidden, architecture

    def values(self, xbar: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """(batch, len(tasks)) gate values of the inputs' mean embeddings `xbar` (batch, d) for `tasks`."""
        outputs = torch.stack([self.gates[t](xbar) for t in tasks], dim=1)  # (batch, tasks, d)
        return gate_values(outputs, torch.stack([self.keys[t] for t in tasks]))

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """What trains in `task`: its gate's two weights and its key."""
        return [self.gates[task].input.weight, self.gates[task].hidden.weight, self.keys[task]]


class PromptTap:
    """Which rows and tokens of the coming forwards are the prompt, for a method that reads it (GainLoRA's gates).

    `reader` is the module whose forward reads the prompt: a causal LM itself, an encoder-decoder's encoder. A
    forward whose input holds more than the prompt (a causal LM's training sequence: prompt and response) runs
    inside `marked(mask)`; unmarked, the prompt is the reader's whole input (its attention mask), as when it
    generates. `weights` (batch,) weigh the rows: 0 for the reader's padding rows.
    """

    def __init__(self, reader: nn.Module) -> None:
        self.reader = reader
        self.mask: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None

    @contextlib.contextmanager
    def marked(self, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> Iterator[None]:
        """The forwards inside read `mask` (batch, tokens) as their prompt, and weigh their rows by `weights`."""
        self.mask, self.weights = mask, weights
        try:
            yield
        finally:
            self.mask, self.weights = None, None


class GateRouter:
    """Sets every gated layer's `gates` from the prompt of each forward: the prompt reader's pre-forward hook arms
    it with the prompt's mask (PromptTap's, or the reader's attention mask), the reader's next input-embedding lookup
    (the prompt's own) gives the embeddings, and the gates of the live tasks follow. A generation step after the first
    reads the cache and keeps the prompt's gates (the reference computes them once per prompt as well).

    While `collector` is set, the gate network's covariance hooks see each row weighted by the tap's row weights;
    while `totals` (tasks + 1,) is set, each row's gates and weight are summed into it (the gate matrix).
    """

    def __init__(self, gates: TaskGates, layers: list[nn.Module], tap: PromptTap) -> None:
        self.gates, self.layers, self.tap = gates, layers, tap
        self.collector: Any = None
        self.totals: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        tap.reader.register_forward_pre_hook(self._read_prompt, with_kwargs=True)
        # The reader's own lookup (a T5 encoder's embed_tokens is a module apart from the model's shared table).
        tap.reader.get_input_embeddings().register_forward_hook(self._route)

    def _read_prompt(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 names it `cache`
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            return  # a generation step reading the cache: the prompt's gates hold
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return  # embeddings given directly: no prompt to read
        mask = self.tap.mask if self.tap.mask is not None else kwargs.get("attention_mask")
        self._pending = (torch.ones_like(input_ids) if mask is None else mask, self.tap.weights)

    def _route(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._pending is None:
            return
        mask, weights = self._pending
        self._pending = None
        if tuple(mask.shape) != tuple(output.shape[:2]):
            raise ValueError(f"a prompt mask of shape {tuple(mask.shape)} does not fit the embeddings of shape "
                             f"{tuple(output.shape)}")  # fmt: skip
        xbar = masked_mean(output.detach(), mask)
        rows = torch.ones(len(xbar), device=xbar.device) if weights is None else weights.to(xbar.device).float()
        live = self.layers[0].live_tasks()
        gates = torch.zeros(len(xbar), len(self.gates.gates), device=xbar.device)
        if live:
            with self.collector.token_mask(rows) if self.collector is not None else contextlib.nullcontext():
                gates[:, live] = self.gates.values(xbar, live)
        for layer in self.layers:
            layer.gates = gates
        if self.totals is not None:
            self.totals[:-1] += (gates.detach().double() * rows.double().unsqueeze(1)).sum(0).cpu()
            self.totals[-1] += float(rows.sum())
