"""GainLoRA's continual-learning benchmarks, read from the user's copy of its `CL_Benchmark/` folder.

Source: github.com/liangyanshuo/gainlora (Liang & Li, "Gated Integration of Low-Rank Adaptation for Continual
Learning of Large Language Models", NeurIPS 2025, arXiv:2505.15424; the InfLoRA authors' follow-up), read at
commit 956a228:

* data layout, `src/cl_dataset.py` (`_generate_examples`): `<root>/SuperNI/<task>/{train,dev,test}.json` (15
  Super-NaturalInstructions tasks) and `<root>/Long_Sequence/<task>/{train,dev,test}.json` (O-LoRA's 15-task
  long benchmark, in lower-case names). A split file is one JSON object in the Super-NI format:
  `"Definition": [str]` and `"Instances": [{"input": str, "output": str | [str, ...]}]` (plus
  "Positive/Negative Examples", unused: every script is zero-shot). dev.json and test.json are the same file.
* prompt, `load_SuperNI_dataset` / `load_LongSeq_dataset` + `src/cl_collator.py` (`instruction.format(input)`):
  SuperNI "Definition: <definition>\\n\\nNow complete the following example -\\nInput: <input>\\nOutput: ",
  Long_Sequence "<definition>\\n<input>\\nOutput: " (the definition stripped). An instance with several outputs
  takes one at random (`random.randint`, unseeded there); here a choice seeded by (seed, task, split, index), so
  a build is reproducible.
* splits: training reads train.json, the evaluation after every task test.json of the tasks seen so far, both in
  full ("sampling strategy": "full" in `configs/gen_script_*_configs/<task>/*_tasks.json`).
* scores, `score.py` and `src/compute_metrics.py`: ROUGE-L (`rouge_score`, `use_stemmer=True`) for every SuperNI
  task, exact match (SQuAD normalisation, articles kept) for every Long_Sequence task; AP and FT of the matrix
  (`inflora_dist/metrics.py`).
* orders, the `--task_order` of the scripts: SuperNI orders 1 and 2 (`gen_script_superni_order{1,2}_t5_*.sh`),
  Long_Sequence orders 3 and 4 (`gen_script_long_order{3,4}_t5_*.sh`), in GainLoRA's numbering.
* InfLoRA's hyper-parameters there (T5-large): lr 3e-4 constant, no warm-up, batch 32 (4 x 8 accumulation on
  SuperNI, 16 x 2 on Long_Sequence), rank 4 (SuperNI) / 8 (Long_Sequence), 100 / 10 epochs, sources cut to 512
  tokens, targets and generation to 50, threshold eps_t = 0.995 + (1 - 0.995) t / T, LoRA on q and v.

Published InfLoRA numbers (AP / FT, %): see `PUBLISHED_INFLORA`. They were taken from secondary summaries of the
GainLoRA paper's tables, not read from the paper itself (which could not be opened from this machine): check its
tables before quoting them. The data files are the user's: nothing here downloads them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from inflora_dist.data.olora import load_json, subsample

#: The benchmark folders under `CL_Benchmark/` and how each is scored (GainLoRA's score.py).
BENCHMARKS: dict[str, str] = {"SuperNI": "rouge_l", "Long_Sequence": "exact_match"}

#: GainLoRA's task orders: 1-2 of SuperNI, 3-4 of Long_Sequence, as (benchmark folder, tasks in training order).
ORDERS: dict[str, tuple[str, list[str]]] = {
    "order1": ("SuperNI", [
        "task1572_samsum_summary", "task363_sst2_polarity_classification", "task1290_xsum_summarization",
        "task181_outcome_extraction", "task002_quoref_answer_generation", "task1510_evalution_relation_extraction",
        "task639_multi_woz_user_utterance_generation", "task1729_personachat_generate_next",
        "task073_commonsenseqa_answer_generation", "task1590_diplomacy_text_generation",
        "task748_glucose_reverse_cause_event_detection", "task511_reddit_tifu_long_text_summarization",
        "task591_sciq_answer_generation", "task1687_sentiment140_classification", "task875_emotion_classification",
    ]),
    "order2": ("SuperNI", [
        "task748_glucose_reverse_cause_event_detection", "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation", "task639_multi_woz_user_utterance_generation",
        "task1572_samsum_summary", "task1687_sentiment140_classification", "task591_sciq_answer_generation",
        "task363_sst2_polarity_classification", "task1510_evalution_relation_extraction",
        "task1729_personachat_generate_next", "task181_outcome_extraction",
        "task511_reddit_tifu_long_text_summarization", "task002_quoref_answer_generation",
        "task1290_xsum_summarization", "task875_emotion_classification",
    ]),
    "order3": ("Long_Sequence", [
        "yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews", "yahoo",
        "multirc", "boolq", "wic",
    ]),
    "order4": ("Long_Sequence", [
        "mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb", "yelp", "amazon", "sst2", "dbpedia", "agnews",
        "multirc", "yahoo",
    ]),
}  # fmt: skip

#: InfLoRA in GainLoRA's tables, (AP, FT) by (model, order); secondary summaries, unverified (module docstring).
PUBLISHED_INFLORA: dict[tuple[str, str], tuple[float, float]] = {
    ("t5-large", "order1"): (39.78, 7.64),
    ("t5-large", "order2"): (39.57, 8.93),
    ("llama-2-7b", "order1"): (42.93, 11.23),
    ("llama-2-7b", "order2"): (39.94, 15.00),
}

SPLITS = ("train", "dev", "test")
_LAYOUT = "GainLoRA's CL_Benchmark/<SuperNI|Long_Sequence>/<task>/"


def build_prompt(benchmark: str, definition: str, text: str) -> str:
    """The zero-shot prompt GainLoRA gives the model for one instance of `benchmark`."""
    if benchmark == "SuperNI":
        return f"Definition: {definition.strip()}\n\nNow complete the following example -\nInput: {text}\nOutput: "
    if benchmark == "Long_Sequence":
        return f"{definition.strip()}\n{text}\nOutput: "
    raise ValueError(f"unknown benchmark {benchmark!r}; benchmarks are {sorted(BENCHMARKS)}")


def _definition(data: dict, path: Path) -> str:
    definition = data.get("Definition")
    if isinstance(definition, list) and definition and isinstance(definition[0], str):
        return definition[0]  # GainLoRA reads the first
    if isinstance(definition, str):
        return definition
    raise ValueError(f'{path} has no "Definition" (a string or a list of strings): {definition!r:.200}')


def _output(instance: dict, path: Path, index: int, rng: random.Random) -> str:
    output = instance.get("output")
    if isinstance(output, str):
        return output
    if isinstance(output, list) and output and all(isinstance(o, str) for o in output):
        return output[rng.randrange(len(output))]
    raise ValueError(f'{path} instance {index} has no "output" string or non-empty list of strings: {instance!r:.200}')


def read_task(root: str | Path, benchmark: str, task: str, split: str, seed: int = 0) -> list[dict[str, str]]:
    """One task's instances of `split` as {"prompt", "response"}, in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; benchmarks are {sorted(BENCHMARKS)}")
    path = Path(root) / benchmark / task / f"{split}.json"
    data = load_json(path, f"the {split} split of {task}", _LAYOUT)
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        raise ValueError(f'{path} must be a Super-NI task object with an "Instances" list')
    definition = _definition(data, path)
    rng = random.Random(f"{seed}:{task}:{split}")
    records = []
    for i, instance in enumerate(data["Instances"]):
        if not isinstance(instance, dict) or not isinstance(instance.get("input"), str):
            raise ValueError(f'{path} instance {i} has no string "input": {instance!r:.200}')
        response = _output(instance, path, i, rng)
        records.append({"prompt": build_prompt(benchmark, definition, instance["input"]), "response": response})
    if not records:
        raise ValueError(f"{path} has no instances")
    return records


def order_tasks(order: str) -> tuple[str, list[str]]:
    """(benchmark folder, tasks) of a published order ("order1".."order4", or "1".."4")."""
    key = order if order in ORDERS else f"order{order}"
    if key not in ORDERS:
        raise ValueError(f"unknown GainLoRA order {order!r}; orders are {sorted(ORDERS)} (1-2 SuperNI, 3-4 long)")
    benchmark, tasks = ORDERS[key]
    return benchmark, list(tasks)


def select_tasks(order: str, tasks: Sequence[str] | str | None = None, num_tasks: int | None = None) -> list[str]:
    """The tasks of `order` a build keeps: all of them, the first `num_tasks`, or the subset `tasks` (names, or
    one comma-separated string) in the order's sequence whatever order they are given in."""
    _, names = order_tasks(order)
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if tasks is not None and num_tasks is not None:
        raise ValueError(f"tasks ({list(tasks)}) and num_tasks ({num_tasks}) both select tasks: give one of them")
    if num_tasks is not None:
        if not 1 <= num_tasks <= len(names):
            raise ValueError(f"num_tasks must be in [1, {len(names)}] for {order}, got {num_tasks}")
        return names[:num_tasks]
    if tasks is None:
        return names
    if not tasks:
        raise ValueError(f"tasks is empty: name at least one task of {order}: {', '.join(names)}")
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise ValueError(f"tasks not in {order}: {', '.join(unknown)}; {order}'s tasks are {', '.join(names)}")
    repeated = sorted({t for t in tasks if list(tasks).count(t) > 1})
    if repeated:
        raise ValueError(f"tasks lists {', '.join(repeated)} more than once")
    return [t for t in names if t in set(tasks)]


def check_root(root: str | Path | None, order: str, tasks: Sequence[str] | None = None, key: str = "root") -> Path:
    """`root` as a Path once it holds GainLoRA's layout for `order`'s `tasks` (default all): each task's
    train.json and test.json. Otherwise FileNotFoundError, one line naming `key`, the path and the layout
    expected (before any file is read)."""
    benchmark, names = order_tasks(order)
    layout = f"{benchmark}/<task>/{{train,test}}.json"
    if root is None or str(root) == "":
        raise ValueError(f"{key} is required: the CL_Benchmark folder of GainLoRA's repository, <root>/{layout}")
    root = Path(root)
    problem = None
    if not (root / benchmark).is_dir():
        problem = f"{root / benchmark} is not a folder"
    else:
        files = [root / benchmark / t / f"{split}.json" for t in (names if tasks is None else tasks)
                 for split in ("train", "test")]  # fmt: skip
        problem = next((f"{p} not found" for p in files if not p.is_file()), None)
    if problem:
        raise FileNotFoundError(
            f"{key}={root} is not GainLoRA's CL_Benchmark folder ({problem}): expected "
            f"{root}/{layout} (the CL_Benchmark folder of GainLoRA's repository)"
        )
    return root


def records_for_build(
    root: str | Path,
    order: str,
    max_train_per_task: int | None = None,
    max_eval_per_task: int | None = None,
    seed: int = 0,
    num_tasks: int | None = None,
    tasks: Sequence[str] | str | None = None,
    root_key: str = "root",
) -> tuple[dict[str, list[dict[str, str]]], dict[str, list[dict[str, str]]], dict[str, str]]:
    """(train records, eval records, metrics) of one order, tasks in training order, for the shard builder.

    Train records come from train.json and eval records from test.json, in full by default (as GainLoRA);
    `max_*_per_task` keep a seeded random subset of each task; `num_tasks` the order's first tasks only, or
    `tasks` a subset of its tasks (kept in the order's sequence), for smoke runs and small cuts. The root is
    checked first (`check_root`; `root_key` is what its errors call it: "--root", "data.build.root").
    """
    benchmark, _ = order_tasks(order)
    names = select_tasks(order, tasks, num_tasks)
    root = check_root(root, order, names, root_key)
    train = {t: subsample(read_task(root, benchmark, t, "train", seed), max_train_per_task, f"{seed}:{t}:train")
             for t in names}  # fmt: skip
    evaluation = {t: subsample(read_task(root, benchmark, t, "test", seed), max_eval_per_task, f"{seed}:{t}:test")
                  for t in names}  # fmt: skip
    return train, evaluation, dict.fromkeys(names, BENCHMARKS[benchmark])
