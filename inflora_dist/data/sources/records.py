"""Prompt/response records from JSON Lines, Parquet, CSV or a saved `datasets` folder (the `records` source of
build_shards, alias `jsonl`)."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from inflora_dist.data.spec import check_path_component

logger = logging.getLogger(__name__)

RECORD_FORMATS = "JSON Lines (.jsonl/.json), Parquet (.parquet), CSV (.csv), or a `datasets` save_to_disk folder"


def _rows(path: Path, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of every record of one source file or folder."""
    if path.is_dir():  # a Hugging Face dataset saved with save_to_disk (the optional `datasets` package)
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError:
            raise ImportError(f"{path} is a folder: reading a saved dataset needs `pip install datasets`") from None
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if split is None or split not in data:
                raise ValueError(f"{path} holds splits {sorted(data)}: choose one with --split (got {split!r})")
            data = data[split]
        for i, row in enumerate(data):
            yield f"{path}[{i}]", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with `datasets`

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[{i}]", row
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            try:
                for row in reader:
                    yield f"{path}:{reader.line_num}", row
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{reader.line_num + 1}: not UTF-8 text ({err.reason})") from None
    elif path.suffix in (".jsonl", ".json"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})") from None
                if line.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not JSON ({err})") from None
    else:
        raise ValueError(f"{path}: unknown record source; expected {RECORD_FORMATS}")


def read_records(
    paths: Sequence[str | Path],
    task_field: str | None = None,
    prompt_field: str = "prompt",
    response_field: str = "response",
    split: str | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Records {prompt, response} grouped by task: by `task_field` if given, else one task per source (its stem).

    Each source is one of RECORD_FORMATS; `split` picks the split of a saved
    DatasetDict. A record missing a field, or whose response is empty (blank,
    or null), is an error naming the source, the record and the field. The
    same prompt twice in a task with different responses is logged, once per
    call (the count and a few examples); exact duplicates are not.
    """
    tasks: dict[str, list[dict[str, str]]] = {}
    first: dict[tuple[str, str], tuple[str, str]] = {}  # (task, prompt) -> (response, where) of its first record
    conflicts: dict[tuple[str, str], str] = {}  # (task, prompt) -> "where 'response'" of both records
    for source in paths:
        path = Path(source)
        for where, record in _rows(path, split):
            try:
                prompt, response = record[prompt_field], record[response_field]
                task = str(record[task_field]) if task_field else path.stem
            except KeyError as err:
                raise ValueError(f"{where}: no field {err} (the record has {sorted(record)})") from None
            if response is None or not str(response).strip():
                raise ValueError(f"{where}: empty response (field {response_field!r} is {response!r})")
            item = {"prompt": str(prompt), "response": str(response)}
            check_path_component(task, f"{where}: field {task_field!r}" if task_field else f"{path}: file name")
            tasks.setdefault(task, []).append(item)
            seen = first.setdefault((task, item["prompt"]), (item["response"], where))
            if seen[0] != item["response"] and (task, item["prompt"]) not in conflicts:
                conflicts[task, item["prompt"]] = f"{seen[1]} {_short(seen[0])} vs {where} {_short(item['response'])}"
    if conflicts:
        examples = "; ".join(f"task {t!r}: {c}" for (t, _), c in list(conflicts.items())[:3])
        logger.warning(
            "%d prompt(s) appear more than once in a task with different responses (both records are kept), e.g. %s",
            len(conflicts), examples,
        )  # fmt: skip
    return tasks


def _short(text: str, width: int = 40) -> str:
    """`text` quoted, cut to `width` characters."""
    return repr(text if len(text) <= width else text[: width - 3] + "...")
