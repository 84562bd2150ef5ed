"""Low-precision linear layers on the host: float32 products, nn.Linear's results and state."""

import pytest
import torch
from torch import nn

from inflora_dist import host_linear
from inflora_dist.config import ModelConfig
from inflora_dist.host_linear import HostFloat32Linear, use_float32_products_on_host
from inflora_dist.models import load_backbone


def _pair(bias: bool, dtype: torch.dtype, trainable: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, 40, bias=bias).to(dtype)
    plain.weight.requires_grad_(trainable)
    fast = nn.Linear(48, 40, bias=bias).to(dtype)
    fast.load_state_dict(plain.state_dict())
    fast.weight.requires_grad_(trainable)
    assert use_float32_products_on_host(fast) == 1 and type(fast) is HostFloat32Linear
    return plain, fast


@pytest.mark.parametrize("bias,trainable", [(True, True), (False, False)])
def test_bf16_products_match_nn_linear_within_one_rounding(monkeypatch, bias, trainable):
    monkeypatch.setattr(host_linear, "CHUNK_ROWS", 16)  # 40 rows: three chunks, the last one short
    plain, fast = _pair(bias, torch.bfloat16, trainable)
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), fast(xb)
    assert yb.dtype == torch.bfloat16 and yb.shape == ya.shape
    assert type(yb.grad_fn).__name__ == "_Float32ProductsBackward"  # the float32 path, not nn.Linear's
    # Both accumulate in float32 and round once: they may differ by the summation order's last bit.
    torch.testing.assert_close(yb, ya, rtol=1e-2, atol=1e-2)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-2, atol=1e-2)
    ref_x = (grad.float() @ plain.weight.detach().float()).to(torch.bfloat16)
    torch.testing.assert_close(xb.grad, ref_x, rtol=1e-2, atol=1e-2)
    if trainable:
        torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=2e-2, atol=2e-2)
    else:
        assert fast.weight.grad is None


def test_float32_layers_are_nn_linear_exactly():
    plain, fast = _pair(True, torch.float32, True)
    x = torch.randn(3, 48)
    assert torch.equal(fast(x), plain(x))


def test_load_backbone_converts_low_precision_models_only():
    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip
    from transformers import AutoModelForCausalLM

    bf16 = load_backbone(ModelConfig(config=config, dtype="bfloat16"), AutoModelForCausalLM)
    linears = [m for m in bf16.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is HostFloat32Linear for m in linears)  # q k v o, the MLP's three, the head
    ids = torch.tensor([[1, 2, 3]])
    assert bf16(input_ids=ids).logits.dtype == torch.bfloat16
    fp32 = load_backbone(ModelConfig(config=config, dtype="float32"), AutoModelForCausalLM)
    assert all(type(m) is nn.Linear for m in fp32.modules() if isinstance(m, nn.Linear))
