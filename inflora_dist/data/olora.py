"""The O-LoRA continual-learning benchmarks, read from the user's copy of O-LoRA's `CL_Benchmark/` folder.

Source: github.com/cmnfriend/O-LoRA (Wang et al., "Orthogonal Subspace Learning for Language Model
Continual Learning", Findings of EMNLP 2023, arXiv:2310.14152), read at commit 07117e1:

* data layout, `src/uie_dataset_lora.py` (`_generate_examples`): `<root>/<type>/<dataset>/{train,dev,test}.json`
  and `<root>/<type>/<dataset>/labels.json`, where <type> is the key of the task config the dataset sits under
  (TC, SC, NLI, QQP, BoolQA, COPA, MultiRC, WiC; see `TASK_TYPES`). A split file is one JSON list of records
  `{"sentence": str, "label": str}`; `labels.json` is a JSON list of the label words. (In the repository
  dev.json and test.json are the same file for every dataset.)
* prompt, `src/uie_dataset_lora.py` (`load_<type>_dataset`) + `src/uie_collator.py` (`get_instruction`, with
  `--add_task_name True --add_dataset_name True` as every script passes) + `configs/instruction_config.json`:
  "Task:<type>\\nDataset:<dataset>\\n<instruction>Option: <labels joined by ', '> \\n<sentence>\\nAnswer:",
  and for COPA (no instruction, no options: the sentence already asks the question)
  "Task:COPA\\nDataset:COPA\\n<sentence>\\nAnswer:". The target is the label word; the score is exact match
  of the generated text (`src/compute_metrics.py`: lower-cased, punctuation and extra spaces removed).
* splits: training reads train.json, evaluation after each task reads test.json of every task seen so far
  (`configs/order*_configs/<task>/test_tasks.json`, `configs/long_configs/<task>/test_tasks.json`), both in
  full ("sampling strategy": "full"; test never capped).
* orders 1-3 (standard benchmark, 4 tasks): `scripts/order_{1,2,3}.sh` (the `--task_config_dir` sequence;
  `scripts_llama/order_*.sh` for LLaMA use the same orders). O-LoRA's `scripts/long.sh` runs the 15-task
  benchmark in one order, which is order 6; orders 4-6 as scripts, in the O-LoRA code base's naming:
  github.com/thuwng/GORP `scripts/order_{4,5,6}.sh` (GORP, ACL 2025, built on O-LoRA's code). They are the
  orders of Progressive Prompts (Razdaibiedina et al., ICLR 2023), which O-LoRA follows.

Published numbers to compare against (average accuracy, %, over all tasks after the last one; exact match):

* O-LoRA on T5-large (arXiv:2310.14152, Table 1): standard benchmark 75.8 (orders 1/2/3: 75.4 / 75.7 / 76.3),
  long benchmark 69.6 (orders 4/5/6: 72.3 / 64.8 / 71.6). The two averages are the paper's headline numbers;
  the per-order values were taken from a secondary summary of that table (their means give 75.8 and 69.6).
  T5-large is an encoder-decoder model: `configs/t5/t5_large_olora_{standard,long}.yaml` run it
  (`model.kind: seq2seq_lm`); `configs/olora/` compares a LLaMA-2-7B run against them across models.
* On LLaMA models: the O-LoRA paper's LLaMA-7B (LLaMA-1) experiment (Alpaca instruction-tuned first, then the
  standard benchmark, order 1) reports 76.8 for O-LoRA. "Merge before Forget" (Qiao & Mahdavi,
  arXiv:2512.23017, main results table) reports, on LLaMA-2-7B-chat, O-LoRA 77.2 (standard) / 73.5 (long) and
  InfLoRA 79.6 / 69.8. Both were taken from secondary summaries of those papers, not checked against the
  PDFs: check the tables before quoting them.

Our framework joins prompt and response its own way (`inflora_dist/data/text.py`: with `model.chat_template:
none`, as the O-LoRA configs set, "<prompt>\\n<response><eos>"; with `auto` the tokenizer's chat template when it
has one) and keeps the response when an example is too long (the prompt is cut from the left, where O-LoRA cuts
the end); the O-LoRA configs schedule the learning rate as O-LoRA does (`train.lr_schedule: constant`). The data
files are the user's: nothing here downloads them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The folder (task type) each dataset sits in under `CL_Benchmark/`, and the type named in the prompt.
TASK_TYPES: dict[str, str] = {
    "dbpedia": "TC",
    "agnews": "TC",
    "yahoo": "TC",
    "amazon": "SC",
    "yelp": "SC",
    "IMDB": "SC",
    "SST-2": "SC",
    "MNLI": "NLI",
    "CB": "NLI",
    "RTE": "NLI",
    "QQP": "QQP",
    "BoolQA": "BoolQA",
    "COPA": "COPA",
    "MultiRC": "MultiRC",
    "WiC": "WiC",
}

#: O-LoRA's `configs/instruction_config.json` (zero-shot, the first and only instruction of each type).
#: COPA has none: its prompt is the sentence alone.
INSTRUCTIONS: dict[str, str] = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
    "Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
    "Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
    "Choose one from the option.\n",
}

#: The standard CL benchmark (4 text-classification tasks).
STANDARD: list[str] = ["dbpedia", "amazon", "yahoo", "agnews"]
#: The long benchmark (15 tasks), in O-LoRA's `scripts/long.sh` order (= order 6).
LONG: list[str] = [
    "yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo",
    "MultiRC", "BoolQA", "WiC",
]  # fmt: skip

#: The published task orders: 1-3 of the standard benchmark, 4-6 of the long one.
ORDERS: dict[str, list[str]] = {
    "order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "order3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "order4": [
        "MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2", "dbpedia",
        "agnews", "MultiRC", "yahoo",
    ],
    "order5": [
        "MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
        "yelp", "amazon", "yahoo",
    ],
    "order6": [
        "yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo",
        "MultiRC", "BoolQA", "WiC",
    ],
}  # fmt: skip

#: O-LoRA's average accuracy (%) on T5-large (arXiv:2310.14152, Table 1), per order and averaged.
PUBLISHED_T5_LARGE: dict[str, float] = {
    "order1": 75.4, "order2": 75.7, "order3": 76.3, "standard": 75.8,
    "order4": 72.3, "order5": 64.8, "order6": 71.6, "long": 69.6,
}  # fmt: skip

SPLITS = ("train", "dev", "test")


def canonical_task(name: str) -> str:
    """The benchmark's spelling of a dataset name (case-insensitive: "sst-2" -> "SST-2"); ValueError lists them."""
    for task in TASK_TYPES:
        if task.lower() == name.lower():
            return task
    raise ValueError(f"unknown O-LoRA task {name!r}; tasks are {sorted(TASK_TYPES, key=str.lower)}")


def task_dir(root: str | Path, task: str) -> Path:
    """`<root>/<type>/<dataset>`, the folder of one dataset (e.g. CL_Benchmark/TC/dbpedia)."""
    task = canonical_task(task)
    return Path(root) / TASK_TYPES[task] / task


def load_json(path: Path, what: str, layout: str = "O-LoRA's CL_Benchmark/<type>/<dataset>/") -> Any:
    """The JSON at `path`; errors name the file, what it should hold and the benchmark `layout` expected."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({what}); expected {layout} layout")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def read_labels(root: str | Path, task: str) -> list[str]:
    """The label words of `task`, in the order of its labels.json (the order the prompt lists them)."""
    path = task_dir(root, task) / "labels.json"
    labels = load_json(path, "the task's label words")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{path} must be a non-empty JSON list of label strings, got {labels!r:.200}")
    return labels


def build_prompt(task: str, sentence: str, labels: Sequence[str]) -> str:
    """The prompt O-LoRA gives the model for one record (task name, dataset name, instruction, options, input)."""
    task = canonical_task(task)
    kind = TASK_TYPES[task]
    prefix = f"Task:{kind}\nDataset:{task}\n"
    if kind == "COPA":
        return f"{prefix}{sentence}\nAnswer:"
    return f"{prefix}{INSTRUCTIONS[kind]}Option: {', '.join(labels)} \n{sentence}\nAnswer:"


def _check_root(root: str | Path) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(
            f"O-LoRA benchmark folder {path} not found: pass the CL_Benchmark/ folder of github.com/cmnfriend/O-LoRA"
        )
    return path


def read_task(root: str | Path, task: str, split: str) -> list[dict[str, str]]:
    """One task's records of `split` as {"prompt", "response"}, in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    task = canonical_task(task)
    labels = read_labels(root, task)
    path = task_dir(root, task) / f"{split}.json"
    items = load_json(path, f"the {split} split of {task}")
    if not isinstance(items, list):
        raise ValueError(f"{path} must be a JSON list of records, got {type(items).__name__}")
    records = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path} record {i} is not a JSON object: {item!r:.200}")
        for key in ("sentence", "label"):
            if not isinstance(item.get(key), str):
                raise ValueError(f"{path} record {i} has no string field {key!r}: {item!r:.200}")
        records.append({"prompt": build_prompt(task, item["sentence"], labels), "response": item["label"]})
    return records


def read_olora_benchmark(root: str | Path, tasks: Sequence[str], split: str) -> dict[str, list[dict[str, str]]]:
    """{task: [{"prompt", "response"}, ...]} for `tasks` (in that order) from O-LoRA's `CL_Benchmark/` at `root`.

    Prompts are built as O-LoRA builds them (see the module docstring); responses are the label words.
    Errors name the missing folder, file or field.
    """
    root = _check_root(root)
    names = [canonical_task(t) for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks repeat: {list(tasks)}")
    return {task: read_task(root, task, split) for task in names}


def order_tasks(order: str | Sequence[str]) -> list[str]:
    """The task list of a published order ("order1".."order6", or "1".."6"), or of an explicit list of tasks."""
    if isinstance(order, str):
        key = order if order in ORDERS else f"order{order}"
        if key not in ORDERS:
            raise ValueError(f"unknown order {order!r}; orders are {sorted(ORDERS)} (or pass a list of tasks)")
        return list(ORDERS[key])
    return [canonical_task(t) for t in order]


def subsample(records: list[dict[str, str]], limit: int | None, seed: str) -> list[dict[str, str]]:
    """A seeded random `limit` of `records`, kept in file order (all of them if `limit` is None or larger)."""
    if limit is None or limit >= len(records):
        return records
    if limit < 1:
        raise ValueError(f"a per-task limit must be >= 1 or None, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def records_for_build(
    root: str | Path,
    order: str | Sequence[str],
    max_train_per_task: int | None = None,
    max_eval_per_task: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, list[dict[str, str]]], dict[str, list[dict[str, str]]], dict[str, str]]:
    """(train records, eval records, metrics) of one order, tasks in training order, for the shard builder.

    Train records come from train.json, eval records from test.json (O-LoRA evaluates on test, in full);
    every task is scored by exact match. `max_train_per_task` / `max_eval_per_task` keep a seeded random
    subset of each task (None: all; O-LoRA's scripts use all of CL_Benchmark's files). The subset of a task
    depends on `seed` and the task only, not on its position in the order.
    """
    root = _check_root(root)
    tasks = order_tasks(order)
    train = read_olora_benchmark(root, tasks, "train")
    evaluation = read_olora_benchmark(root, tasks, "test")
    for task in tasks:
        if not train[task]:
            raise ValueError(f"{task_dir(root, task) / 'train.json'} has no records")
        if not evaluation[task]:
            raise ValueError(f"{task_dir(root, task) / 'test.json'} has no records")
        train[task] = subsample(train[task], max_train_per_task, f"{seed}:{task}:train")
        evaluation[task] = subsample(evaluation[task], max_eval_per_task, f"{seed}:{task}:test")
    return train, evaluation, dict.fromkeys(tasks, "exact_match")
