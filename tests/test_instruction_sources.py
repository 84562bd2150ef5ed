"""Instruction tasks from packaged text data: the real files, their counts, and shards built from them."""

from __future__ import annotations

from collections import Counter

import pytest

from inflora_dist.data import TaskLoader, load_task_sequence, open_task
from inflora_dist.data.build_shards import main as build_shards
from inflora_dist.data.instruction_sources import (
    CHAT_TOPICS,
    LANGUAGES,
    QUESTION_TOPICS,
    demo_sequence,
    package_file,
    read_conversations,
    read_lines,
)


def _installed(dist: str) -> bool:
    try:
        package_file(dist, "METADATA")
    except FileNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _installed("chatterbot-corpus"),
    reason="chatterbot-corpus is not installed (scripts/install_assets.sh, run by make test)",
)


def test_packaged_corpora_have_the_documented_counts():
    topics = read_conversations()
    assert len(topics) == 21
    assert {t: len(topics[t]) for t in ("tech_support", "trivia", "coding", "ai")} == {
        "tech_support": 1050, "trivia": 261, "coding": 184, "ai": 105,
    }  # fmt: skip
    # The demo's label texts: distinct lines of 3-30 words, distinct questions.
    assert {lang: len({t for lines in read_lines(lang).values() for t in lines}) for lang in LANGUAGES} == {
        "english": 1513, "spanish": 748, "italian": 961, "portuguese": 595,
    }  # fmt: skip
    assert {t: len({q for q, _ in topics[t]}) for t in QUESTION_TOPICS} == {
        "trivia": 261, "coding": 96, "ai": 61, "psychology": 62,
    }  # fmt: skip
    english = read_lines()
    assert {t: len(english[t]) for t in CHAT_TOPICS} == {"literature": 61, "movies": 42, "sports": 42, "science": 44}
    with pytest.raises(ValueError, match="no language 'klingon'"):
        read_lines("klingon")


def test_demo_sequence_builds_and_streams_back(tmp_path):
    records, metrics = demo_sequence(per_label=10, seed=0)
    assert list(records) == ["language_id", "question_topic", "chat_topic"]
    assert [len(records[t]) for t in records] == [40, 40, 40]
    for task, labels in zip(records, (LANGUAGES, QUESTION_TOPICS, CHAT_TOPICS), strict=True):
        assert Counter(r["response"] for r in records[task]) == dict.fromkeys(labels, 10)  # balanced
        assert len({r["prompt"] for r in records[task]}) == 40  # no text twice (train and eval stay apart)
    with pytest.raises(ValueError, match="fewer texts"):
        demo_sequence(per_label=43)
    build_shards(["llm-demo", "--out", str(tmp_path), "--per-label", "10", "--shard-size", "8", "--quiet"])
    seq = load_task_sequence(str(tmp_path / "tasks.yaml"), check_shards=True)
    assert [t.instruction.metric for t in seq.tasks] == ["exact_match"] * 3
    assert seq.tasks[0].instruction.labels == sorted(LANGUAGES)
    back = []
    for t, name in enumerate(records):
        for split in ("train", "eval"):
            for batch in TaskLoader(open_task(seq, t, split, batch_size=4, mode="exact", rank=0, world_size=1)):
                back += [(j["prompt"], j["response"]) for j, w in zip(batch["json"], batch["weight"], strict=True) if w]
        assert metrics[name] == seq.tasks[t].instruction.metric
    assert sorted(back) == sorted((r["prompt"], r["response"]) for rs in records.values() for r in rs)
