"""The O-LoRA benchmark reader (inflora_dist/data/olora.py) and the LLaMA-2-7B configs that use it.

The real CL_Benchmark/ data (github.com/cmnfriend/O-LoRA) is not redistributed here and is not available
offline, so each test writes a small tree in its exact format: `<root>/<type>/<dataset>/{train,dev,test}.json`
(JSON lists of {"label", "sentence"}) and `labels.json` (a JSON list of label words, the real lists).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inflora_dist.config import RunConfig, merge_structured, read_yaml, validate_run_config
from inflora_dist.data import olora

REPO = Path(__file__).resolve().parents[1]

# The real labels.json of every dataset, and its folder, as in O-LoRA's CL_Benchmark/.
LABELS = {
    "TC/dbpedia": ["Company", "Educational Institution", "Artist", "Athlete", "Office Holder",
                   "Mean of Transportation", "Building", "Natural Place", "Village", "Animal", "Plant", "Album",
                   "Film", "Written Work"],
    "TC/agnews": ["World", "Sports", "Business", "Science or Technology"],
    "TC/yahoo": ["Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
                 "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
                 "Family & Relationships", "Politics & Government"],
    "SC/amazon": ["very negative", "negative", "neutral", "positive", "very positive"],
    "SC/yelp": ["very negative", "negative", "neutral", "positive", "very positive"],
    "SC/IMDB": ["Good", "Bad"],
    "SC/SST-2": ["Good", "Bad"],
    "NLI/MNLI": ["neutral", "entailment", "contradiction"],
    "NLI/CB": ["entailment", "contradiction", "neutral"],
    "NLI/RTE": ["contradiction", "entailment"],
    "QQP/QQP": ["False", "True"],
    "BoolQA/BoolQA": ["True", "False"],
    "COPA/COPA": ["A", "B"],
    "MultiRC/MultiRC": ["False", "True"],
    "WiC/WiC": ["True", "False"],
}  # fmt: skip

# Made-up sentences in each dataset's input format.
SENTENCES = {
    "TC": "Title: Local team wins the cup\nText: The home side won the final on Sunday.\n",
    "SC": "Title: Works fine\nText: The kettle boils fast and looks good on the counter.",
    "NLI": "sentence 1: The cat sleeps on the mat.\nsentence 2: An animal is resting.",
    "QQP": "first sentence: How do I learn to cook?\nsecond sentence: What is the best way to learn cooking?",
    "BoolQA": "question: is the sun a star\npassage: The Sun is the star at the centre of the Solar System.",
    "COPA": 'Which sentence is the effect of "The glass fell."? Choose one between A and B.\nA: It broke.\nB: It sang.',
    "MultiRC": "paragraph: Ann walked home.\nquestion: Who walked home?\ncandidate answer: Ann",
    "WiC": "word: bank\nShe sat on the bank of the river.\nHe works at the bank.",
}


def write_benchmark(root: Path, per_split: dict[str, int] | None = None) -> Path:
    """A CL_Benchmark/ tree with every dataset; records cycle through the labels, sentences carry their index."""
    per_split = per_split or {"train": 6, "dev": 3, "test": 4}
    for folder, labels in LABELS.items():
        kind, _ = folder.split("/")
        d = root / folder
        d.mkdir(parents=True)
        (d / "labels.json").write_text(json.dumps(labels))
        for split, n in per_split.items():
            records = [
                {"label": labels[i % len(labels)], "sentence": f"{SENTENCES[kind]} #{split}{i}"} for i in range(n)
            ]
            (d / f"{split}.json").write_text(json.dumps(records))
    return root


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    return write_benchmark(tmp_path / "CL_Benchmark")


def test_prompts_are_built_as_olora_builds_them(bench):
    """Task and dataset prefix, the type's instruction, the options in labels.json order, the input, "Answer:"."""
    data = olora.read_olora_benchmark(bench, ["agnews", "MNLI", "COPA", "yelp"], "train")
    assert list(data) == ["agnews", "MNLI", "COPA", "yelp"]
    first = data["agnews"][0]
    assert first == {
        "prompt": "Task:TC\nDataset:agnews\nWhat is the topic of the following paragraph? Choose one from the option.\n"
        "Option: World, Sports, Business, Science or Technology \n"
        "Title: Local team wins the cup\nText: The home side won the final on Sunday.\n #train0\nAnswer:",
        "response": "World",
    }
    assert data["MNLI"][1]["prompt"] == (
        'Task:NLI\nDataset:MNLI\nWhat is the logical relationship between the "sentence 1" and the "sentence 2"? '
        "Choose one from the option.\nOption: neutral, entailment, contradiction \n"
        "sentence 1: The cat sleeps on the mat.\nsentence 2: An animal is resting. #train1\nAnswer:"
    )
    assert data["MNLI"][1]["response"] == "entailment"
    # COPA has no instruction and no options: the sentence asks the question.
    assert data["COPA"][0]["prompt"] == f"Task:COPA\nDataset:COPA\n{SENTENCES['COPA']} #train0\nAnswer:"
    assert data["yelp"][4]["response"] == "very positive"
    assert "Option: very negative, negative, neutral, positive, very positive \n" in data["yelp"][0]["prompt"]
    assert len(data["agnews"]) == 6 and [r["response"] for r in data["agnews"][:4]] == LABELS["TC/agnews"]


def test_every_dataset_reads_from_its_type_folder(bench):
    """All 15 datasets, each prompt naming its type and dataset; names are matched case-insensitively."""
    data = olora.read_olora_benchmark(bench, olora.LONG, "test")
    assert sorted(data) == sorted(olora.TASK_TYPES) and all(len(v) == 4 for v in data.values())
    for task, records in data.items():
        assert records[0]["prompt"].startswith(f"Task:{olora.TASK_TYPES[task]}\nDataset:{task}\n")
        assert records[0]["prompt"].endswith(" #test0\nAnswer:")
    assert list(olora.read_olora_benchmark(bench, ["sst-2", "boolqa"], "dev")) == ["SST-2", "BoolQA"]


def test_orders_are_the_published_task_lists():
    assert olora.ORDERS["order1"] == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert olora.ORDERS["order2"] == ["dbpedia", "amazon", "agnews", "yahoo"]
    assert olora.ORDERS["order3"] == ["yahoo", "amazon", "agnews", "dbpedia"]
    assert (
        olora.ORDERS["order4"]
        == "MNLI CB WiC COPA QQP BoolQA RTE IMDB yelp amazon SST-2 dbpedia agnews MultiRC yahoo".split()
    )
    assert (
        olora.ORDERS["order5"]
        == "MultiRC BoolQA WiC MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yelp amazon yahoo".split()
    )
    assert (
        olora.ORDERS["order6"]
        == "yelp amazon MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yahoo MultiRC BoolQA WiC".split()
    )
    for name in ("order1", "order2", "order3"):
        assert sorted(olora.ORDERS[name]) == sorted(olora.STANDARD)
    for name in ("order4", "order5", "order6"):
        assert sorted(olora.ORDERS[name]) == sorted(olora.LONG) == sorted(olora.TASK_TYPES)
    assert olora.LONG == olora.ORDERS["order6"]  # O-LoRA's scripts/long.sh
    assert olora.order_tasks("4") == olora.order_tasks("order4")
    published = olora.PUBLISHED_T5_LARGE
    assert published["standard"] == 75.8 and published["long"] == 69.6
    assert round((published["order1"] + published["order2"] + published["order3"]) / 3, 1) == published["standard"]
    assert round((published["order4"] + published["order5"] + published["order6"]) / 3, 1) == published["long"]


def test_missing_files_folders_and_fields_are_named(bench, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        olora.read_olora_benchmark(missing, ["agnews"], "train")
    (bench / "TC" / "agnews" / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"TC/agnews/test\.json"):
        olora.read_olora_benchmark(bench, ["dbpedia", "agnews"], "test")
    (bench / "NLI" / "CB" / "labels.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"NLI/CB/labels\.json"):
        olora.read_olora_benchmark(bench, ["CB"], "train")
    shutil.rmtree(bench / "SC" / "IMDB")
    with pytest.raises(FileNotFoundError, match=r"SC/IMDB"):
        olora.read_olora_benchmark(bench, ["IMDB"], "train")
    (bench / "WiC" / "WiC" / "train.json").write_text(json.dumps([{"label": "True", "text": "no sentence"}]))
    with pytest.raises(ValueError, match=r"WiC/WiC/train\.json record 0 has no string field 'sentence'"):
        olora.read_olora_benchmark(bench, ["WiC"], "train")
    (bench / "QQP" / "QQP" / "dev.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"QQP/QQP/dev\.json is not valid JSON"):
        olora.read_olora_benchmark(bench, ["QQP"], "dev")
    with pytest.raises(ValueError, match="unknown O-LoRA task 'boolq'"):
        olora.read_olora_benchmark(bench, ["boolq"], "train")
    with pytest.raises(ValueError, match="split must be one of"):
        olora.read_olora_benchmark(bench, ["agnews"], "validation")
    with pytest.raises(ValueError, match="unknown order 'order7'"):
        olora.records_for_build(bench, "order7")


def test_records_for_build_train_from_train_eval_from_test(bench):
    train, evaluation, metrics = olora.records_for_build(bench, "order3")
    assert list(train) == list(evaluation) == list(metrics) == ["yahoo", "amazon", "agnews", "dbpedia"]
    assert set(metrics.values()) == {"exact_match"}
    assert all(len(train[t]) == 6 and len(evaluation[t]) == 4 for t in train)
    assert all(r["prompt"].endswith(f" #train{i}\nAnswer:") for i, r in enumerate(train["amazon"]))
    assert all(r["prompt"].endswith(f" #test{i}\nAnswer:") for i, r in enumerate(evaluation["amazon"]))


def test_per_task_caps_keep_a_seeded_subset_in_file_order(bench):
    train, evaluation, _ = olora.records_for_build(bench, "order1", max_train_per_task=3, max_eval_per_task=2, seed=5)
    full_train, full_eval, _ = olora.records_for_build(bench, "order1")
    for task in olora.ORDERS["order1"]:
        assert len(train[task]) == 3 and len(evaluation[task]) == 2
        positions = [full_train[task].index(r) for r in train[task]]
        assert positions == sorted(positions)
        assert all(r in full_eval[task] for r in evaluation[task])
    again, _, _ = olora.records_for_build(bench, ["agnews", "dbpedia"], max_train_per_task=3, seed=5)
    assert again["agnews"] == train["agnews"]  # the subset depends on the seed and the task, not the position
    other, _, _ = olora.records_for_build(bench, "order1", max_train_per_task=3, seed=6)
    assert any(other[t] != train[t] for t in train)


def test_shard_builder_trains_on_train_and_evaluates_on_test(bench, tmp_path):
    """`build_shards olora`: train.json becomes the train split, test.json the eval split, in the order's order."""
    from inflora_dist.data.build_shards import main as build_shards

    out = tmp_path / "shards"
    config = build_shards(["olora", "--root", str(bench), "--order", "order2", "--out", str(out), "--quiet"])
    train, held_out, _ = olora.records_for_build(bench, "order2")
    assert [t.name for t in config.tasks] == olora.ORDERS["order2"]
    for task in config.tasks:
        assert (task.train.samples, task.eval.samples) == (len(train[task.name]), len(held_out[task.name]))
    agnews = config.tasks[2]
    assert agnews.instruction.metric == "exact_match" and agnews.instruction.labels == sorted(LABELS["TC/agnews"])


@pytest.mark.parametrize(("name", "order"), [("llama2_7b_standard", "order1"), ("llama2_7b_long", "order4")])
def test_llama2_configs_are_valid_run_configs(name, order, tmp_path):
    """Both configs validate once the user's paths exist (model.pretrained and data.tasks overridden here)."""
    model, tasks = tmp_path / "Llama-2-7b-hf", tmp_path / "tasks.yaml"
    model.mkdir()
    tasks.write_text("kind: instruction\n")
    raw = read_yaml(str(REPO / "configs" / "olora" / f"{name}.yaml"))
    assert raw.model.pretrained == "/path/to/Llama-2-7b-hf"  # the placeholder the user must edit
    benchmark = "standard" if order == "order1" else "long"
    assert raw.data.tasks == f"runs/shards/olora_{benchmark}_{order}/tasks.yaml"
    cfg = merge_structured(RunConfig, raw, overrides=[f"model.pretrained={model}", f"data.tasks={tasks}"])
    validate_run_config(cfg)
    assert cfg.model.kind == "causal_lm" and cfg.model.dtype == "bfloat16" and cfg.model.max_new_tokens == 50
    assert cfg.deepspeed.zero_stage == 3 and cfg.method == "inflora"
    assert cfg.inflora.targets == ["q_proj", "v_proj"]  # as O-LoRA's and GainLoRA's code adapt LLaMA
    assert cfg.inflora.covariance_max_tokens == 65536
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 1 and cfg.train.global_batch_size == 64
