"""`python -m inflora_dist.assets timm-vit`: a timm ViT checkpoint (.npz AugReg layout, .safetensors, .pth) ->
transformers ViTModel, checked against a forward pass written here from the checkpoint's own tensors (no timm).

The checkpoints are small random ones in timm's layouts (depth 2, width 64, 4 heads, patch 8, image 32); the npz
one is written as timm's `vision_transformer._load_weights` reads AugReg files. scripts/check_timm_vit.py checks
the converter against timm itself (ViT-B/16).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from inflora_dist import assets

REPO = Path(__file__).resolve().parents[1]

DEPTH, DIM, HEADS, PATCH, IMAGE, MLP, CLASSES = 2, 64, 4, 8, 32, 256, 10
TOLERANCE = 1e-5


def timm_state(seed: int = 0, qkv_bias: bool = True, embed_class: bool = True) -> dict[str, torch.Tensor]:
    """A random timm VisionTransformer state dict (float32) with a classifier head of CLASSES classes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return mean + scale * torch.randn(*shape, generator=g)

    grid = (IMAGE // PATCH) ** 2
    state = {
        "cls_token": rand(1, 1, DIM),
        "pos_embed": rand(1, grid + 1 if embed_class else grid, DIM),
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rand(DIM),
        "norm.weight": rand(DIM, mean=1.0),
        "norm.bias": rand(DIM),
        "head.weight": rand(CLASSES, DIM),
        "head.bias": rand(CLASSES),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        state |= {
            p + "norm1.weight": rand(DIM, mean=1.0),
            p + "norm1.bias": rand(DIM),
            p + "attn.qkv.weight": rand(3 * DIM, DIM),
            p + "attn.qkv.bias": rand(3 * DIM),
            p + "attn.proj.weight": rand(DIM, DIM),
            p + "attn.proj.bias": rand(DIM),
            p + "norm2.weight": rand(DIM, mean=1.0),
            p + "norm2.bias": rand(DIM),
            p + "mlp.fc1.weight": rand(MLP, DIM),
            p + "mlp.fc1.bias": rand(MLP),
            p + "mlp.fc2.weight": rand(DIM, MLP, scale=0.1),
            p + "mlp.fc2.bias": rand(DIM),
        }
        if not qkv_bias:
            del state[p + "attn.qkv.bias"]
    return state


def augreg_npz(state: dict[str, torch.Tensor], heads: int = HEADS) -> dict[str, np.ndarray]:
    """`state` in the AugReg .npz layout: the check script's writer (the inverse of timm's `_load_weights`)."""
    spec = importlib.util.spec_from_file_location("check_timm_vit", REPO / "scripts" / "check_timm_vit.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # numpy only at import: timm is imported by its `make` step alone
    return script.augreg_arrays(state, heads)


def reference_forward(state: dict[str, torch.Tensor], heads: int, x: torch.Tensor) -> torch.Tensor:
    """timm's forward_features from the checkpoint's tensors, in float64: patch conv, class token + positions,
    pre-norm blocks (fused qkv attention, exact-GELU MLP), final LayerNorm (eps 1e-6)."""
    s = {k: v.double() for k, v in state.items()}
    x = x.double()
    eps, hd = 1e-6, DIM // heads
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    batch = t.shape[0]
    if s["pos_embed"].shape[1] == t.shape[1]:  # no_embed_class: positions for the patches only
        t = torch.cat([s["cls_token"].expand(batch, -1, -1), t + s["pos_embed"]], dim=1)
    else:
        t = torch.cat([s["cls_token"].expand(batch, -1, -1), t], dim=1) + s["pos_embed"]
    tokens = t.shape[1]
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (DIM,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps)
        qkv = F.linear(h, s[p + "attn.qkv.weight"], s.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(batch, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5, dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(batch, tokens, DIM)
        t = t + F.linear(o, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = F.layer_norm(t, (DIM,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])), s[p + "mlp.fc2.weight"],
                     s[p + "mlp.fc2.bias"])  # fmt: skip
        t = t + h
    return F.layer_norm(t, (DIM,), s["norm.weight"], s["norm.bias"], eps)


def write(state: dict[str, torch.Tensor], path: Path, heads: int = HEADS) -> Path:
    if path.suffix == ".npz":
        np.savez(path, **augreg_npz(state, heads))
    elif path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def load(out: Path) -> torch.nn.Module:
    from transformers import ViTModel

    model, info = ViTModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth"])
def test_converted_model_matches_the_checkpoints_forward(tmp_path: Path, suffix: str) -> None:
    state = timm_state()
    checkpoint = write(state, tmp_path / f"vit{suffix}")
    out = tmp_path / "vit-hf"
    heads = [] if suffix == ".npz" else ["--num-heads", str(HEADS)]  # the npz's per-head layout says 4
    assert assets.main(["timm-vit", "--checkpoint", str(checkpoint), "--out", str(out), *heads]) == 0

    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "conversion.json"}
    model = load(out)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (DIM, DEPTH, HEADS, MLP)
    assert (c.patch_size, c.image_size, c.num_channels, c.layer_norm_eps) == (PATCH, IMAGE, 3, 1e-6)
    assert (c.qkv_bias, c.hidden_act) == (True, "gelu")
    with torch.inference_mode():
        got = model(pixel_values=pixels())
    want = reference_forward(state, HEADS, pixels())
    assert got.last_hidden_state.shape == (3, 1 + (IMAGE // PATCH) ** 2, DIM)
    diff = float((got.last_hidden_state.double() - want).abs().max())
    assert diff < TOLERANCE, f"max abs diff {diff:.3g}"
    # timm's pooled feature (global_pool='token'): the CLS token after the final norm; the pooler is the identity
    assert torch.equal(got.pooler_output, got.last_hidden_state[:, 0])

    provenance = json.loads((out / "conversion.json").read_text())
    assert provenance["source"]["file"] == str(checkpoint)
    assert len(provenance["source"]["sha256"]) == 64
    dropped = ["head/bias", "head/kernel"] if suffix == ".npz" else ["head.bias", "head.weight"]
    assert provenance["source"]["dropped"] == dropped
    assert provenance["source"]["num_heads_from"] == ("npz per-head layout" if suffix == ".npz" else "--num-heads")
    assert assets.is_timm_vit_converted(out, checkpoint)


def test_heads_default_to_hidden_over_64_and_qkv_bias_follows_the_checkpoint(tmp_path: Path) -> None:
    state = timm_state(seed=2, qkv_bias=False)
    checkpoint = write(state, tmp_path / "vit.safetensors")
    assets.convert_timm_vit(checkpoint, tmp_path / "out")
    model = load(tmp_path / "out")
    assert (model.config.num_attention_heads, model.config.qkv_bias) == (DIM // 64, False)
    with torch.inference_mode():
        got = model(pixel_values=pixels()).last_hidden_state
    assert float((got.double() - reference_forward(state, DIM // 64, pixels())).abs().max()) < TOLERANCE


def test_position_embeddings_without_a_class_row(tmp_path: Path) -> None:
    """no_embed_class (DeiT-3, big_vision): pos_embed covers the patches only; the class token gets none."""
    state = timm_state(seed=3, embed_class=False)
    out = assets.convert_timm_vit(write(state, tmp_path / "vit.pth"), tmp_path / "out", num_heads=HEADS)
    model = load(out)
    assert model.config.image_size == IMAGE
    with torch.inference_mode():
        got = model(pixel_values=pixels()).last_hidden_state
    assert float((got.double() - reference_forward(state, HEADS, pixels())).abs().max()) < TOLERANCE


def test_a_wrapped_training_checkpoint_converts(tmp_path: Path) -> None:
    """A .pth from a training script: the state dict under `model`, saved from DDP (`module.` prefixes)."""
    state = timm_state(seed=4)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    model = load(assets.convert_timm_vit(tmp_path / "ckpt.pth", tmp_path / "out", num_heads=HEADS))
    with torch.inference_mode():
        got = model(pixel_values=pixels()).last_hidden_state
    assert float((got.double() - reference_forward(state, HEADS, pixels())).abs().max()) < TOLERANCE


def test_npz_heads_disagreeing_with_num_heads_are_refused(tmp_path: Path) -> None:
    checkpoint = write(timm_state(), tmp_path / "vit.npz")
    with pytest.raises(assets.AssetError, match=r"--num-heads 8, but the npz's attention kernels have 4 heads"):
        assets.convert_timm_vit(checkpoint, tmp_path / "out", num_heads=8)
    assert not (tmp_path / "out").exists()


def _resnet() -> dict[str, torch.Tensor]:
    return {
        "conv1.weight": torch.zeros(8, 3, 7, 7),
        "bn1.weight": torch.ones(8),
        "bn1.running_mean": torch.zeros(8),
        "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        "fc.weight": torch.zeros(CLASSES, 8),
        "fc.bias": torch.zeros(CLASSES),
    }


def _swin() -> dict[str, torch.Tensor]:
    return {
        "patch_embed.proj.weight": torch.zeros(DIM, 3, 4, 4),
        "patch_embed.proj.bias": torch.zeros(DIM),
        "patch_embed.norm.weight": torch.ones(DIM),
        "layers.0.blocks.0.norm1.weight": torch.ones(DIM),
        "layers.0.blocks.0.attn.qkv.weight": torch.zeros(3 * DIM, DIM),
        "layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(49, HEADS),
        "norm.weight": torch.ones(DIM),
        "norm.bias": torch.zeros(DIM),
        "head.fc.weight": torch.zeros(CLASSES, DIM),
    }


def _deit_distilled() -> dict[str, torch.Tensor]:
    state = timm_state()
    state |= {"dist_token": torch.zeros(1, 1, DIM), "head_dist.weight": torch.zeros(CLASSES, DIM)}
    state["pos_embed"] = torch.zeros(1, 2 + (IMAGE // PATCH) ** 2, DIM)
    return state


def _missing_fc2_bias() -> dict[str, torch.Tensor]:
    state = timm_state()
    del state["blocks.1.mlp.fc2.bias"]
    return state


# (file name, checkpoint, names the message must hold)
REFUSED = {
    "resnet": (
        "resnet50.pth",
        _resnet,
        ["missing", "cls_token", "blocks.0.attn.qkv.weight", "unexpected", "bn1.running_mean", "conv1.weight"],
    ),
    "swin": (
        "swin.safetensors",
        _swin,
        ["cls_token", "pos_embed", "layers.0.blocks.0.attn.qkv.weight", "patch_embed.norm.weight", "head.fc.weight"],
    ),
    "deit-distilled": (
        "deit.safetensors",
        _deit_distilled,
        ["missing 0 keys", "unexpected 2 keys", "dist_token", "head_dist.weight"],
    ),
    "missing key": ("vit.pth", _missing_fc2_bias, ["missing 1 keys [blocks.1.mlp.fc2.bias]", "unexpected 0 keys"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_other_checkpoints_are_refused_in_one_line_before_writing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    name, build, words = REFUSED[case]
    checkpoint = write(build(), tmp_path / name)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger=assets.__name__):
        assert assets.main(["timm-vit", "--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(f"timm-vit: {checkpoint}: not a timm ViT checkpoint"), errors[0]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert not out.exists() and list(tmp_path.iterdir()) == [checkpoint]  # nothing written, no temporary left


def test_npz_with_a_missing_array_or_of_another_architecture_is_refused(tmp_path: Path) -> None:
    arrays = augreg_npz(timm_state())
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    np.savez(tmp_path / "vit.npz", **arrays)
    with pytest.raises(assets.AssetError) as e:
        assets.convert_timm_vit(tmp_path / "vit.npz", tmp_path / "out")
    assert str(tmp_path / "vit.npz") in str(e.value)
    assert "missing 1 keys [Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias], unexpected 0 keys" in str(e.value)

    bit = {"resnet/root_block/standardized_conv2d/kernel": np.zeros((7, 7, 3, 8), np.float32),
           "resnet/block1/unit01/a/group_norm/gamma": np.ones(8, np.float32),
           "head/conv2d/kernel": np.zeros((1, 1, 8, CLASSES), np.float32)}  # fmt: skip
    np.savez(tmp_path / "bit.npz", **bit)
    with pytest.raises(assets.AssetError, match=r"bit\.npz: .*missing 1 keys \[embedding/kernel\].*unexpected 3 keys"):
        assets.convert_timm_vit(tmp_path / "bit.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_k_proj_and_v_proj_targets_find_every_block(tmp_path: Path) -> None:
    """The project's ViT targets [k_proj, v_proj]: the converted model's key/value projections, two per block."""
    from safetensors import safe_open

    from inflora_dist.inject import inject_inflora

    out = assets.convert_timm_vit(write(timm_state(), tmp_path / "vit.npz"), tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # the file keeps the transformers 4 names
        assert {f"encoder.layer.{DEPTH - 1}.attention.attention.{n}.weight" for n in ("key", "value")} <= set(f.keys())
    model = load(out)
    report = inject_inflora(model, ["k_proj", "v_proj"], rank=2, num_tasks=2)
    assert len(report.layers) == 2 * DEPTH
    assert all(name.endswith(("k_proj", "v_proj")) for name in report.layers)
    assert len(report.groups) == DEPTH and all(len(members) == 2 for members in report.groups.values())
    assert set(report.dims.values()) == {DIM}


def test_cli_skips_the_same_checkpoint_and_redoes_another(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = write(timm_state(), tmp_path / "a.safetensors")
    out = tmp_path / "out"
    args = ["timm-vit", "--out", str(out), "--num-heads", str(HEADS), "--checkpoint"]
    assert assets.main([*args, str(first)]) == 0
    before = (out / "model.safetensors").stat()
    with caplog.at_level(logging.INFO, logger=assets.__name__):
        assert assets.main([*args, str(first)]) == 0
    assert "skipped" in caplog.text
    after = (out / "model.safetensors").stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert not assets.is_timm_vit_converted(out, first, num_heads=2)

    second = write(timm_state(seed=5), tmp_path / "b.safetensors")
    assert not assets.is_timm_vit_converted(out, second)
    assert assets.main([*args, str(second)]) == 0
    assert assets.is_timm_vit_converted(out, second) and not assets.is_timm_vit_converted(out, first)
    assert assets.main([*args, str(second), "--force"]) == 0
    assert (out / "model.safetensors").stat().st_ino != after.st_ino
