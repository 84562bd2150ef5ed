"""Low-precision linear layers on the host, computed with float32 products.

Without AVX-512 BF16, PyTorch's CPU GEMM for bfloat16 falls back to generic loops, and the backward's `grad @ W`
(both operands untransposed) is the slowest of them. Measured 2026-12-07 on this project's machine (AMD EPYC, AVX2,
one thread, a LLaMA-2-7B MLP weight of 11008 x 4096, 96 tokens; `bench.large.time_host_linear`): x W^T at 10.9
GFLOPS and grad W at 0.24 in bfloat16, against 31.2 and 32.7 with float32 products (casts included; docs/scaling.md
section 7). A bf16 model whose every block carries a trained branch back-propagates through every frozen weight:
one optimizer step of the 7B-shaped run took hours there. `HostFloat32Linear` keeps the stored weight (no memory
added but one chunk's float32 copy) and computes each product in float32, rounding the result to the input's dtype
as the bf16 kernel does (it accumulates in float32 too: results differ from it in the last bit of about 0.02% of
elements, by summation order). On an accelerator, or in float32, it is nn.Linear.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Weight rows cast to float32 at once: bounds the copy (64 MiB at d_in 4096) for a 49,152-row LM head.
CHUNK_ROWS = 4096
LOW_PRECISION = (torch.bfloat16, torch.float16)


class _Float32Products(torch.autograd.Function):
    """y = x W^T + b, and its gradients, with float32 products of the low-precision operands."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Under ZeRO-3 `weight` is the partitioned parameter itself: DeepSpeed gathers it again before backward.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        x32 = x.float()
        out = torch.cat([x32 @ rows.float().T for rows in weight.split(CHUNK_ROWS)], dim=-1)
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            parts = zip(grad.split(CHUNK_ROWS, dim=-1), weight.split(CHUNK_ROWS), strict=True)
            grad_x = sum(g.float() @ rows.float() for g, rows in parts).to(grad.dtype)
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (flat.float().T @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.float().sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b


class HostFloat32Linear(nn.Linear):
    """nn.Linear whose bf16/fp16 products on the host are computed in float32 (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.device.type == "cpu" and w.dtype in LOW_PRECISION and x.dtype == w.dtype:
            return _Float32Products.apply(x, w, self.bias)
        return F.linear(x, w, self.bias)


def use_float32_products_on_host(model: nn.Module) -> int:
    """Turn every plain nn.Linear of `model` into a HostFloat32Linear (same parameters, same state dict);
    returns how many. The choice is made at each call, so a model later moved to an accelerator is unchanged."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for m in linears:
        m.__class__ = HostFloat32Linear
    return len(linears)
