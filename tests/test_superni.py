"""GainLoRA's benchmark reader (inflora_dist/data/superni.py) and the SuperNI configs that use it.

The real CL_Benchmark/ data (github.com/liangyanshuo/gainlora) is not redistributed here and is not available
offline, so each test writes a small tree in its exact format: `<root>/SuperNI/<task>/{train,dev,test}.json`
and `<root>/Long_Sequence/<task>/...`, each one Super-NI task object (URL, Categories, Definition, Positive and
Negative Examples, Instances of {"id", "input", "output"}), outputs lists of strings or, as in task363, task875
and task1687 there, plain strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inflora_dist.config import RunConfig, merge_structured, read_yaml, validate_run_config
from inflora_dist.data import superni

REPO = Path(__file__).resolve().parents[1]
PLAIN_OUTPUT = ("task363", "task875", "task1687")  # the tasks whose outputs are strings, not lists


def _task_object(task: str, split: str, n: int, definition: str) -> dict:
    plain = task.startswith(PLAIN_OUTPUT) or "_" not in task  # the Long_Sequence tasks have plain outputs too
    instances = [
        {"id": f"{task.split('_')[0]}-{split}{i}", "input": f"Input text {i} of {task} ({split}).",
         "output": f"answer {i}" if plain else [f"answer {i}", f"other answer {i}"]}
        for i in range(n)
    ]  # fmt: skip
    return {
        "URL": ["https://example.org"], "Categories": ["Test"], "Input_language": ["English"],
        "Output_language": ["English"], "Instruction_language": ["English"], "Domains": ["Test"],
        "Positive Examples": [{"input": "a", "output": "b", "explanation": "c"}],
        "Negative Examples": [{"input": "a", "output": "d", "explanation": "e"}],
        "Instances": instances, "Definition": [definition],
    }  # fmt: skip


def write_benchmark(root: Path, per_split: dict[str, int] | None = None) -> Path:
    """A CL_Benchmark/ tree with every task of GainLoRA's four orders; dev.json is test.json, as there."""
    per_split = per_split or {"train": 6, "test": 3}
    for benchmark, tasks in {b: {t for o, (bb, ts) in superni.ORDERS.items() if bb == b for t in ts}
                             for b in superni.BENCHMARKS}.items():  # fmt: skip
        for task in tasks:
            d = root / benchmark / task
            d.mkdir(parents=True)
            definition = f"  In this task, you do {task}.  "  # stripped in the prompt
            for split, n in per_split.items():
                (d / f"{split}.json").write_text(json.dumps(_task_object(task, split, n, definition)))
            (d / "dev.json").write_text((d / "test.json").read_text())
    return root


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    return write_benchmark(tmp_path / "CL_Benchmark")


def test_prompts_are_built_as_gainlora_builds_them(bench):
    records = superni.read_task(bench, "SuperNI", "task363_sst2_polarity_classification", "train")
    assert records[1] == {
        "prompt": "Definition: In this task, you do task363_sst2_polarity_classification.\n\n"
        "Now complete the following example -\n"
        "Input: Input text 1 of task363_sst2_polarity_classification (train).\nOutput: ",
        "response": "answer 1",
    }
    long = superni.read_task(bench, "Long_Sequence", "cb", "test")
    assert long[0] == {
        "prompt": "In this task, you do cb.\nInput text 0 of cb (test).\nOutput: ",
        "response": "answer 0",
    }


def test_an_instance_with_several_outputs_takes_one_seeded_choice(bench):
    task = "task1572_samsum_summary"
    first = superni.read_task(bench, "SuperNI", task, "train", seed=0)
    for i, record in enumerate(first):
        assert record["response"] in (f"answer {i}", f"other answer {i}")
    assert superni.read_task(bench, "SuperNI", task, "train", seed=0) == first  # reproducible
    seeds = {tuple(r["response"] for r in superni.read_task(bench, "SuperNI", task, "train", seed=s)) for s in range(8)}
    assert len(seeds) > 1  # the choice depends on the seed


def test_orders_are_gainloras_task_lists():
    benchmark, order1 = superni.order_tasks("1")
    assert benchmark == "SuperNI" and len(order1) == len(set(order1)) == 15
    assert order1[:3] == ["task1572_samsum_summary", "task363_sst2_polarity_classification",
                          "task1290_xsum_summarization"]  # fmt: skip
    assert superni.order_tasks("order2")[1][0] == "task748_glucose_reverse_cause_event_detection"
    assert set(superni.order_tasks("order2")[1]) == set(order1)
    assert superni.order_tasks("3") == ("Long_Sequence", superni.ORDERS["order3"][1])
    assert (
        set(superni.ORDERS["order3"][1]) == set(superni.ORDERS["order4"][1]) and len(superni.ORDERS["order4"][1]) == 15
    )
    with pytest.raises(ValueError, match="unknown GainLoRA order '7'"):
        superni.order_tasks("7")


def test_missing_files_and_bad_instances_are_named(bench, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CL_Benchmark/SuperNI/task999_x/train\.json not found"):
        superni.read_task(bench, "SuperNI", "task999_x", "train")
    path = bench / "SuperNI" / "task181_outcome_extraction" / "train.json"
    data = json.loads(path.read_text())
    data["Instances"][2]["output"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"train.json instance 2 has no \"output\""):
        superni.read_task(bench, "SuperNI", "task181_outcome_extraction", "train")
    with pytest.raises(FileNotFoundError, match="nowhere is not GainLoRA's CL_Benchmark folder"):
        superni.records_for_build(tmp_path / "nowhere", "order1")
    with pytest.raises(ValueError, match="num_tasks must be in"):
        superni.records_for_build(bench, "order1", num_tasks=16)


def test_shard_builder_trains_on_train_and_scores_superni_by_rouge_l(bench, tmp_path):
    """`build_shards superni`: train.json is the train split, test.json the eval split, in the order's order;
    SuperNI tasks are scored by ROUGE-L, Long_Sequence tasks by exact match, as GainLoRA's score.py does."""
    from inflora_dist.data.build_shards import main as build_shards

    out = tmp_path / "shards"
    config = build_shards(["superni", "--root", str(bench), "--order", "order2", "--num-tasks", "4",
                           "--out", str(out), "--quiet"])  # fmt: skip
    assert [t.name for t in config.tasks] == superni.ORDERS["order2"][1][:4]
    assert all(t.instruction.metric == "rouge_l" for t in config.tasks)
    assert [(t.train.samples, t.eval.samples) for t in config.tasks] == [(6, 3)] * 4
    long = build_shards(["superni", "--root", str(bench), "--order", "order3", "--max-train-per-task", "4",
                         "--out", str(tmp_path / "long"), "--quiet"])  # fmt: skip
    assert len(long.tasks) == 15 and all(t.instruction.metric == "exact_match" for t in long.tasks)
    assert long.tasks[0].train.samples == 4 and long.tasks[0].instruction.labels == [
        "answer 0",
        "answer 1",
        "answer 2",
        "answer 3",
        "answer 4",
        "answer 5",
    ]


@pytest.mark.parametrize("method", ["", "gainlora_"], ids=["inflora", "gainlora"])
@pytest.mark.parametrize("order", ["order1", "order2"])
def test_superni_llama2_configs_are_valid_run_configs(order, method, tmp_path):
    """The InfLoRA and GainLoRA configs validate once the user's paths exist (model.pretrained and data.tasks
    overridden here), with GainLoRA's settings (and its gates' for method gainlora)."""
    from inflora_dist.engine import lr_factor

    model, tasks = tmp_path / "Llama-2-7b-hf", tmp_path / "tasks.yaml"
    model.mkdir()
    tasks.write_text("kind: instruction\n")
    raw = read_yaml(str(REPO / "configs" / "superni" / f"llama2_7b_{method}{order}.yaml"))
    assert (
        raw.model.pretrained == "/path/to/Llama-2-7b-hf" and raw.data.tasks == f"runs/shards/superni_{order}/tasks.yaml"
    )
    cfg = merge_structured(RunConfig, raw, overrides=[f"model.pretrained={model}", f"data.tasks={tasks}"])
    validate_run_config(cfg)
    assert cfg.model.kind == "causal_lm" and cfg.deepspeed.zero_stage == 3 and cfg.model.max_new_tokens == 50
    assert cfg.inflora.targets == ["q_proj", "v_proj"] and cfg.inflora.rank == 4
    assert (cfg.inflora.lambda_begin, cfg.inflora.lambda_end) == (0.995, 1.0)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.global_batch_size) == (5e-5, 50, 32)
    assert cfg.model.max_length == 1074  # GainLoRA's LLaMA scripts: sources 1024 + targets 50
    assert cfg.train.lr_schedule == "constant" and lr_factor(cfg.train.lr_schedule, 90, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(2**-0.5)  # the default decays
    if method:  # gen_script_superni_order*_llama_gainlora_inflora.sh
        g = cfg.gainlora
        assert cfg.method == "gainlora" and (g.branches, g.lora_alpha, g.gate_architecture) == ("inflora", 32, "llama")
        assert (g.gate_hidden, g.lambda_begin, g.lambda_end, g.planned_tasks) == (50, 0.995, 1.0, 15)


@pytest.mark.parametrize(
    ("name", "tasks", "rank", "lr", "epochs"),
    [("t5_large_olora_standard", "olora_standard_order1", 8, 1e-3, 1),
     ("t5_large_olora_long", "olora_long_order4", 8, 1e-3, 1),
     ("t5_large_superni_order1", "superni_order1", 4, 3e-4, 100),
     ("t5_large_gainlora_superni_order1", "superni_order1", 4, 3e-4, 100)],
)  # fmt: skip
def test_t5_large_configs_are_valid_run_configs(name, tasks, rank, lr, epochs, tmp_path):
    """The T5-large configs (O-LoRA's standard and long benchmarks, GainLoRA's SuperNI) validate once the
    user's paths exist; they train an encoder-decoder (model.kind seq2seq_lm) on q and v, bf16 under ZeRO-3."""
    model, sequence = tmp_path / "t5-large", tmp_path / "tasks.yaml"
    model.mkdir()
    sequence.write_text("kind: instruction\n")
    raw = read_yaml(str(REPO / "configs" / "t5" / f"{name}.yaml"))
    assert raw.model.pretrained == "/path/to/t5-large" and raw.data.tasks == f"runs/shards/{tasks}/tasks.yaml"
    cfg = merge_structured(RunConfig, raw, overrides=[f"model.pretrained={model}", f"data.tasks={sequence}"])
    validate_run_config(cfg)
    assert cfg.model.kind == "seq2seq_lm" and cfg.model.dtype == "bfloat16" and cfg.deepspeed.zero_stage == 3
    assert (cfg.model.max_length, cfg.model.max_new_tokens) == (512, 50) and cfg.inflora.targets == ["q", "v"]
    assert (cfg.inflora.rank, cfg.train.lr, cfg.train.epochs, cfg.train.lr_schedule) == (rank, lr, epochs, "constant")
    if "gainlora" in name:  # gen_script_superni_order1_t5_gainlora_inflora.sh: the T5 gate of 100 units
        assert cfg.method == "gainlora" and (cfg.gainlora.gate_architecture, cfg.gainlora.gate_hidden) == ("t5", 100)


ORDER1 = superni.ORDERS["order1"][1]


def test_tasks_select_a_subset_kept_in_the_orders_sequence(bench, tmp_path):
    """`--tasks a,b`: those tasks only, trained in the order's sequence whatever order they are given in; a name
    not in the order is named with the order's tasks listed; --tasks and --num-tasks exclude each other."""
    from inflora_dist.data.build_shards import main as build_shards

    chosen = [ORDER1[8], ORDER1[1], ORDER1[3]]  # commonsenseqa, sst2, outcome extraction: given out of order
    args = ["superni", "--root", str(bench), "--order", "order1", "--quiet"]
    config = build_shards([*args, "--tasks", ",".join(chosen), "--out", str(tmp_path / "subset")])
    assert [t.name for t in config.tasks] == [ORDER1[1], ORDER1[3], ORDER1[8]]
    with pytest.raises(ValueError, match=r"tasks not in order1: task999_nope; order1's tasks are task1572_samsum"):
        build_shards([*args, "--tasks", f"{ORDER1[1]},task999_nope", "--out", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="both select tasks"):
        build_shards([*args, "--tasks", ORDER1[1], "--num-tasks", "2", "--out", str(tmp_path / "both")])
    with pytest.raises(ValueError, match=f"tasks lists {ORDER1[1]} more than once"):
        superni.select_tasks("order1", [ORDER1[1], ORDER1[1]])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "both").exists()


def test_a_root_not_in_gainloras_layout_fails_in_one_line_naming_the_path(bench, tmp_path):
    """Checked before any file is read: the root, its SuperNI/ folder, each selected task's train and test."""
    with pytest.raises(FileNotFoundError) as err:
        superni.records_for_build(tmp_path, "order1", root_key="--root")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--root={tmp_path} is not GainLoRA's CL_Benchmark folder")
    assert f"expected {tmp_path}/SuperNI/<task>/{{train,test}}.json" in message
    (bench / "SuperNI" / ORDER1[3] / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{ORDER1[3]}/test\.json not found"):
        superni.records_for_build(bench, "order1", tasks=[ORDER1[1], ORDER1[3]])
    assert list(superni.records_for_build(bench, "order1", tasks=[ORDER1[1]])[0]) == [ORDER1[1]]  # not selected


def test_a_runs_data_build_selects_tasks_and_names_data_build_root(bench, tmp_path):
    """`data.build` with source superni: `tasks: [..]` (a YAML list) is --tasks; a missing or wrong `root`
    fails naming data.build.root before anything is written."""
    from omegaconf import OmegaConf

    from inflora_dist.data.build_shards import build_from_config

    build = OmegaConf.create({"source": "superni", "root": str(bench), "order": "order1", "num_tasks": None,
                              "tasks": [ORDER1[13], ORDER1[1]], "max_train_per_task": 2})  # fmt: skip
    config = build_from_config(build, tmp_path / "shards")
    assert [(t.name, t.train.samples, t.eval.samples) for t in config.tasks] == [(ORDER1[1], 2, 3), (ORDER1[13], 2, 3)]
    wrong = "data.build.root=.*nowhere is not GainLoRA's CL_Benchmark"
    for root, match in [(None, "data.build.root is required"), (str(tmp_path / "nowhere"), wrong)]:
        bad = OmegaConf.merge(build, {"root": root})
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            build_from_config(bad, tmp_path / "never")
        assert not (tmp_path / "never").exists()


def test_smollm2_cpu_config_is_a_valid_run_config_whose_build_needs_the_root(bench, tmp_path):
    """configs/superni/smollm2_cpu.yaml: the packaged SmolLM2 on a cut of order 1 built by the run itself; its
    placeholder root fails naming data.build.root, and with a real root it builds the tasks it names."""
    from inflora_dist.data.build_shards import build_from_config

    raw = read_yaml(str(REPO / "configs" / "superni" / "smollm2_cpu.yaml"))
    cfg = merge_structured(RunConfig, raw, overrides=[f"model.pretrained={tmp_path}"])  # the asset may be absent
    validate_run_config(cfg)
    build = cfg.data.build
    assert cfg.model.kind == "causal_lm" and raw.model.pretrained == "assets/smollm2-135m-instruct"
    assert (build["source"], build["order"], cfg.inflora.targets) == ("superni", "order1", ["q_proj", "v_proj"])
    assert build["tasks"] == [t for t in ORDER1 if t in build["tasks"]]  # listed in the order's sequence
    with pytest.raises(FileNotFoundError, match=r"data\.build\.root=/path/to/CL_Benchmark is not GainLoRA's"):
        build_from_config(build, tmp_path / "shards")
    config = build_from_config({**build, "root": str(bench)}, tmp_path / "shards")
    assert [t.name for t in config.tasks] == build["tasks"]
    assert all(t.instruction.metric == "rouge_l" for t in config.tasks)
