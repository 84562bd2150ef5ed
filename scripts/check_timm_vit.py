"""Check `python -m inflora_dist.assets timm-vit` against timm itself, on a randomly initialised ViT-B/16.

Two steps, in two venvs (timm and torchvision must not go into the project venv; the reference venv has no
transformers):

    /work/refvenv/bin/python scripts/check_timm_vit.py make [--dir /tmp/check_timm_vit]
    .venv/bin/python scripts/check_timm_vit.py compare [--dir /tmp/check_timm_vit]

`make` (needs timm, torch, safetensors, numpy): `timm.create_model("vit_base_patch16_224_in21k", pretrained=False)`
(the paper's backbone, alias of `vit_base_patch16_224.augreg_in21k`; 21843-class head kept, as in the real
checkpoint), every parameter perturbed with seeded noise (timm initialises biases to 0 and norms to 1, which would
hide a swapped bias or norm); writes its state dict as `vit_b16.safetensors` and the same weights in the AugReg
layout as `vit_b16.npz`. The npz is checked here by timm's own reader: a fresh model loaded with
`vision_transformer._load_weights` must give the same `forward_features`. Saves a seeded input batch
(`inputs.npy`), timm's `forward_features` (`features.npy`) and its pooled feature (`forward_head(...,
pre_logits=True)`, `pooled.npy`), and checks that `forward_features` ends with the final norm (equal to
`norm(blocks(...))`). `meta.json` records all of it.

`compare` (the project venv): converts both files with our converter (the .safetensors without --num-heads: hidden
/ 64 = 12 heads), loads each with `ViTModel.from_pretrained`, runs the saved input and prints one JSON line: per
format the max abs difference of `last_hidden_state` to timm's `forward_features` and of `pooler_output` to timm's
pooled feature, and pass/fail at 1e-5 (float32 both sides, CPU). Exit status 0 when everything passes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MODEL = "vit_base_patch16_224_in21k"
TOLERANCE = 1e-5
SEED = 0
BATCH = 2


def augreg_arrays(state: dict, heads: int) -> dict[str, np.ndarray]:
    """A timm ViT state dict in the AugReg .npz layout (the inverse of timm's `_load_weights`, non-big_vision)."""
    n = {k: v.detach().float().numpy() for k, v in state.items()}
    dim = n["cls_token"].shape[-1]
    hd = dim // heads
    depth = 1 + max(int(k.split(".")[1]) for k in n if k.startswith("blocks."))
    w = {
        "embedding/kernel": n["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": n["patch_embed.proj.bias"],
        "cls": n["cls_token"],
        "Transformer/posembed_input/pos_embedding": n["pos_embed"],
        "Transformer/encoder_norm/scale": n["norm.weight"],
        "Transformer/encoder_norm/bias": n["norm.bias"],
    }
    if "head.weight" in n:
        w["head/kernel"], w["head/bias"] = n["head.weight"].T, n["head.bias"]
    for i in range(depth):
        b, p = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = b + "MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * dim, (j + 1) * dim)
            w[f"{mha}{name}/kernel"] = n[p + "attn.qkv.weight"][rows].T.reshape(dim, heads, hd)
            w[f"{mha}{name}/bias"] = n[p + "attn.qkv.bias"][rows].reshape(heads, hd)
        w[mha + "out/kernel"] = n[p + "attn.proj.weight"].T.reshape(heads, hd, dim)
        w[mha + "out/bias"] = n[p + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = n[f"{p}{norm}.weight"], n[f"{p}{norm}.bias"]
        for r in range(2):
            w[f"{b}MlpBlock_3/Dense_{r}/kernel"] = n[f"{p}mlp.fc{r + 1}.weight"].T
            w[f"{b}MlpBlock_3/Dense_{r}/bias"] = n[f"{p}mlp.fc{r + 1}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in w.items()}


def make(out: Path) -> dict:
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.models.vision_transformer import _load_weights

    torch.manual_seed(SEED)
    model = timm.create_model(MODEL, pretrained=False).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 0.02))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "vit_b16.safetensors"))
    heads = model.blocks[0].attn.num_heads
    np.savez(out / "vit_b16.npz", **augreg_arrays(state, heads))

    x = torch.randn(BATCH, 3, 224, 224, generator=g)
    with torch.inference_mode():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        normed = model.norm(model.blocks(t))  # forward_features ends with the final norm
        fresh = timm.create_model(MODEL, pretrained=False).eval()
        _load_weights(fresh, str(out / "vit_b16.npz"))  # timm's own AugReg reader
        npz_feats = fresh.forward_features(x)
    np.save(out / "inputs.npy", x.numpy())
    np.save(out / "features.npy", feats.numpy())
    np.save(out / "pooled.npy", pooled.numpy())
    meta = {
        "step": "make",
        "timm": timm.__version__,
        "torch": torch.__version__,
        "model": MODEL,
        "pretrained_cfg": model.pretrained_cfg.get("tag") or model.pretrained_cfg.get("architecture"),
        "global_pool": model.global_pool,
        "num_heads": heads,
        "features_shape": list(feats.shape),
        "forward_features_includes_final_norm": bool(torch.equal(normed, feats)),
        "pooled_is_cls_of_features": bool(torch.equal(pooled, feats[:, 0])),
        "npz_read_by_timm_max_abs_diff": float((npz_feats - feats).abs().max()),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def compare(out: Path) -> dict:
    import torch
    from transformers import ViTModel

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from inflora_dist.assets import convert_timm_vit

    x = torch.from_numpy(np.load(out / "inputs.npy"))
    feats, pooled = np.load(out / "features.npy"), np.load(out / "pooled.npy")
    result: dict = {"step": "compare", "model": MODEL, "tolerance": TOLERANCE, "formats": {}}
    for name in ("vit_b16.safetensors", "vit_b16.npz"):
        hf_dir = convert_timm_vit(out / name, out / f"hf-{name.replace('.', '-')}")
        model = ViTModel.from_pretrained(hf_dir).eval()
        with torch.inference_mode():
            got = model(pixel_values=x)
        hidden = float(np.abs(got.last_hidden_state.numpy() - feats).max())
        pool = float(np.abs(got.pooler_output.numpy() - pooled).max())
        result["formats"][Path(name).suffix[1:]] = {
            "num_attention_heads": model.config.num_attention_heads,
            "last_hidden_state_vs_forward_features_max_abs_diff": hidden,
            "pooler_output_vs_timm_pooled_max_abs_diff": pool,
            "pass": hidden < TOLERANCE and pool < TOLERANCE,
        }
    result["max_abs_diff"] = max(f["last_hidden_state_vs_forward_features_max_abs_diff"]
                                 for f in result["formats"].values())  # fmt: skip
    result["pass"] = all(f["pass"] for f in result["formats"].values())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["make", "compare"])
    parser.add_argument("--dir", default="/tmp/check_timm_vit", help="working directory (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.dir)
    result = make(out) if args.step == "make" else compare(out)
    print(json.dumps(result), flush=True)
    if args.step == "make":
        ok = result["forward_features_includes_final_norm"] and result["npz_read_by_timm_max_abs_diff"] < TOLERANCE
        return 0 if ok else 1
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
