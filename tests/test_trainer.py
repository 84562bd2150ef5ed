"""The training framework end to end: real processes, a real DeepSpeed engine, gloo, W&B offline."""

from __future__ import annotations

import glob
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainer_runs import (
    REPO,
    command,
    env,
    heads_and_statistics,
    interrupt_two_processes,
    results,
    tiny_shards,
    train,
    workers,
)

from inflora_dist.config import RunConfig, load_run_config
from inflora_dist.data.build_shards import FASHION_MNIST_DIR
from inflora_dist.dist import free_port
from inflora_dist.loop import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(), reason="Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "shards"
    return tiny_shards(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """Finished runs by (processes, ZeRO stage), each made once per module."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[tuple[int, int], Path] = {}

    def get(nproc: int, stage: int) -> Path:
        if (nproc, stage) not in done:
            out = root / f"p{nproc}-z{stage}"
            extra = ["wandb.enabled=true", "wandb.mode=offline"] if (nproc, stage) == (1, 0) else []
            if stage == 3:  # partition even the tiny test's parameters (the default keeps small ones whole)
                extra.append("deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
            train(nproc, out, f"deepspeed.zero_stage={stage}", "export.merged_model=true", *extra, shards=shards)
            done[nproc, stage] = out
        return done[nproc, stage]

    return get


#: Per stage: seconds of training, the two passes and their reductions, the subspace math, class statistics and
#: alignment; memory per rank.
TIMING_KEYS = {"train_s", "design_pass_s", "design_reduce_s", "subspace_design_s", "update_pass_s", "update_reduce_s",
               "subspace_update_s", "class_statistics_s", "alignment_s", "rss_mb_per_rank",
               "peak_rss_mb_per_rank"}  # fmt: skip


def test_one_process_run_writes_every_output(runs):
    out = runs(1, 0)
    metrics, state = results(out)
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
    assert [len(r) for r in metrics["task_incremental_accuracy_matrix"]] == [1, 2, 3]
    assert [len(r) for r in metrics["ncm_accuracy_matrix"]] == [1, 2, 3]
    assert metrics["ca"] is True and [set(t) for t in metrics["timings"]] == [TIMING_KEYS] * 3
    assert "zero_shot" not in metrics  # untrained heads: no zero-shot row for classification
    stats = json.loads((out / "class_statistics.json").read_text())
    assert stats["form"] == "full" and stats["task_offsets"] == [0, 2, 4, 6] and len(stats["class_ids"]) == 6
    for key in ("avg_acc", "avg_incremental_acc", "bwt", "forgetting"):
        assert isinstance(metrics[key], float)
    assert metrics["task_incremental_accuracy_matrix"][0][0] > 70  # the tiny ViT learns task 0
    for png in ("accuracy_matrix.png", "accuracy_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = load_run_config(str(out / "config.yaml"))
    assert resolved.output_dir == str(out) and resolved.deepspeed.zero_stage == 0
    groups = json.loads((out / "continual_state.json").read_text())
    assert len(state) > 0 and groups
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "peft_adapter" / name).exists()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["000001-task1-done", "000002-task2-done"]  # keep: 2, oldest pruned


def test_wandb_offline_run_has_the_logged_keys(runs):
    """A real offline W&B run: its record file holds every logged key (protobuf keeps keys as raw strings)."""
    out = runs(1, 0)
    records = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()
    keys = ["train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "cl/avg_acc", "cl/bwt"]
    keys += ["cl/forgetting", "time/covariance_pass_s", "subspace/", "accuracy_matrix", "accuracy_heatmap"]
    keys += ["cl/ncm_avg_acc", "time/alignment_s", "time/class_statistics_s", "ca/loss"]
    for key in keys:
        assert key.encode() in data, key
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/accuracy_matrix_*.table.json"))
    assert len(tables) == 3  # one per task


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_processes_reproduce_one_process(runs, stage):
    """Same seed and global batch at 1 and 2 processes, ZeRO 0/2/3: same A (1e-5), class statistics and aligned
    heads (1e-6; under ZeRO-3 every head is partitioned), and the same three accuracy matrices."""
    ref_metrics, ref_state = results(runs(1, 0))
    metrics, state = results(runs(2, stage))
    assert sorted(state) == sorted(ref_state)
    for name, tensor in state.items():
        if ".A." in name:
            torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-5, msg=name)
    ref_heads, heads = heads_and_statistics(runs(1, 0)), heads_and_statistics(runs(2, stage))
    assert sorted(heads) == sorted(ref_heads) and any(k.startswith("stats.covariances") for k in heads)
    for name, tensor in heads.items():
        torch.testing.assert_close(tensor, ref_heads[name], rtol=1e-6, atol=1e-6, msg=name)
    # The merged export (backbone gathered from its ZeRO-3 partitions, heads, class map) is the 1-process one.
    for file in ("model.safetensors", "heads.safetensors"):
        ref, got = load_file(str(runs(1, 0) / "model" / file)), load_file(str(runs(2, stage) / "model" / file))
        assert sorted(got) == sorted(ref), file
        for name, tensor in got.items():
            torch.testing.assert_close(tensor, ref[name], rtol=1e-5, atol=1e-5, msg=name)
    classes = json.loads((runs(2, stage) / "model" / "classes.json").read_text())
    assert len(classes["class_ids"]) == 6 and [t["logits"] for t in classes["tasks"]] == [[0, 2], [2, 4], [4, 6]]
    for key in ("accuracy_matrix", "task_incremental_accuracy_matrix", "ncm_accuracy_matrix"):
        assert metrics[key] == ref_metrics[key], key


@pytest.mark.parametrize("how", ["sigusr1", "sigkill"])
def test_interrupted_run_resumes_to_the_same_result(runs, shards, tmp_path, how):
    """Stop a 2-process ZeRO-2 run mid-task 1 (pre-emption signal, or kill -9), resume=auto, compare."""
    out = tmp_path / "run"
    overrides = [f"data.tasks={shards}/tasks.yaml", "deepspeed.zero_stage=2", "checkpoint.every_steps=3",
                 "checkpoint.keep=20"]  # fmt: skip
    log = interrupt_two_processes(overrides, out, signal.SIGUSR1 if how == "sigusr1" else signal.SIGKILL)
    names = [p.name for p in (out / "checkpoints").iterdir()]
    assert not any(n.endswith("task1-done") or "task2" in n for n in names), names  # stopped mid-task 1
    if how == "sigusr1":
        assert any(n.endswith("-preempted") for n in names), log[-3000:]
        assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in log or f"exit code {PREEMPTED_EXIT_CODE}" in log, log[-3000:]
    train(2, out, "deepspeed.zero_stage=2", "checkpoint.every_steps=3", "checkpoint.keep=20", "resume=auto",
          shards=shards)  # fmt: skip
    metrics, state = results(out)
    ref_metrics, ref_state = results(runs(2, 2))
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-6, msg=name)
    adapter = REPO / out / "peft_adapter" / "adapter_model.safetensors"
    ref_adapter = runs(2, 2) / "peft_adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    b, ref_b = load_file(str(adapter)), load_file(str(ref_adapter))
    for name in ref_b:
        torch.testing.assert_close(b[name], ref_b[name], rtol=0, atol=1e-6, msg=name)


def test_preempted_after_training_resumes_exactly(runs, shards, tmp_path):
    """SIGUSR1 as task 1's training ends, while the statistics pass and classifier alignment run: every rank stops
    at the task boundary (exit 75, its checkpoint complete) and the rerun ends as the uninterrupted run."""
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", "deepspeed.zero_stage=2"]
    proc = subprocess.Popen(command(2, *overrides), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "stage 1: folding the branch" in line:  # logged when training ends, before the post-training work
            for w in workers(proc):
                w.send_signal(signal.SIGUSR1)
            break
    log = "".join(lines) + proc.communicate(timeout=120)[0]
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in log, log[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # At the boundary (the usual case), or, had the signal come after it, at task 2's first step.
    assert "pre-empted before stage 2" in log or names[-1].endswith("-preempted"), (names, log[-3000:])
    assert "000001-task1-done" in names and not any(n.endswith("task2-done") for n in names), names
    train(2, out, "deepspeed.zero_stage=2", "resume=auto", shards=shards)
    metrics, ref_metrics = results(out)[0], results(runs(2, 2))[0]
    for key in ("accuracy_matrix", "task_incremental_accuracy_matrix", "ncm_accuracy_matrix"):
        assert metrics[key] == ref_metrics[key], key
    ref = heads_and_statistics(runs(2, 2))
    for name, tensor in heads_and_statistics(out).items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=1e-6, msg=name)


def test_bad_configs_name_the_problem(tmp_path, shards):
    base = ["model.config={model_type: vit}", f"data.tasks={shards}/tasks.yaml"]
    cases = {
        "inflora.rnak=3": r"unknown key 'rnak' in InfLoRAConfig .* valid keys: \['accumulation_dtype'",
        "deepspeed.zero_stage=5": r"deepspeed.zero_stage must be one of \[0, 1, 2, 3\], got 5",
        "inflora.lambda_begin=0": r"inflora.lambda_begin must be in \(0, 1\], got 0",
        "inflora.planned_tasks=0": r"inflora.planned_tasks must be an integer >= 1 or null, got 0",
        "inflora.covariance_max_tokens=0": r"inflora.covariance_max_tokens must be an integer >= 1 or null, got 0",
        "inflora.covariance_max_tokens=-5": r"inflora.covariance_max_tokens must be an integer >= 1 or null, got -5",
        "inflora.reduce_bucket_bytes=0": r"inflora.reduce_bucket_bytes must be an integer >= 1, got 0",
        "train.global_batch_size=-4": r"train.global_batch_size must be an integer >= 1, got -4",
        "train.lr=fast": r"bad value for 'train.lr'",
        "ca.covariance=low_rank": r"ca.covariance must be one of \['full', 'diagonal', 'shared'\], got 'low_rank'",
        "ca.logit_norm=0": r"ca.logit_norm \(a temperature\) must be > 0 or null, got 0",
        "ca.samples_per_class=0": r"ca.samples_per_class must be an integer >= 1, got 0",
        "method=simple_lora": r"method must be one of \['inflora', 'seq_lora', 'joint', 'simple_cil', 'olora', "
        r"'gainlora'\]",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_run_config(None, [*base, override])
    for extra in ("ca.enabled=true", "method=simple_cil"):
        with pytest.raises(ValueError, match=rf"{extra.replace('=true', '')}.*need a classification model"):
            load_run_config(None, [*base, "model.kind=causal_lm", extra])
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_run_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match=r"model.pretrained: /no/such/dir"):
        load_run_config(None, [*base, "model.pretrained=/no/such/dir"])
    proc = subprocess.run(command(1, "inflora.rnak=3"), cwd=REPO, env=env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown key 'rnak'" in proc.stderr


def test_deepspeed_launcher_runs_the_same_job(runs, shards, tmp_path):
    """`deepspeed launch/train.py` (its own launcher, 2 processes) gives the torchrun result; no /dev/shm left."""
    out = tmp_path / "ds"
    port = str(free_port())
    args = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", port,
            str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny_vit.yaml"),
            f"output_dir={out}", f"data.tasks={shards}/tasks.yaml", "deepspeed.zero_stage=2"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics, _ = results(out)
    assert metrics["accuracy_matrix"] == results(runs(2, 2))[0]["accuracy_matrix"]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def test_config_files_compose_in_order():
    """Several --config files merge in order (a model file, a task file, a run file), then overrides."""
    cfg = load_run_config(
        [str(REPO / "configs" / "tiny_vit.yaml"), str(REPO / "configs" / "tasks" / "fmnist_5x2.yaml")],
        ["train.epochs=3"],
    )
    assert cfg.data.build["tasks"] == 5 and cfg.data.tasks.endswith("fmnist_5x2/tasks.yaml")
    assert cfg.train.epochs == 3 and cfg.model.image_size == 28


@pytest.mark.parametrize(
    "name", ["imagenet_r_10task", "cifar100_10task", "domainnet", "imagenet_r_10task_ca", "cifar100_10task_ca"]
)
def test_paper_configs_are_valid_run_configs(name):
    """The GPU configs parse into RunConfig with the reference's settings (paths are the user's)."""
    from inflora_dist.config import merge_structured, read_yaml

    cfg = merge_structured(RunConfig, read_yaml(str(REPO / "configs" / "paper" / f"{name}.yaml")))
    assert cfg.train.global_batch_size == 128 and cfg.inflora.lambda_end == 1.0
    assert cfg.inflora.targets == ["k_proj", "v_proj"]
    assert cfg.ca.enabled == name.endswith("_ca")


def test_joint_trains_every_task_at_once(shards, tmp_path):
    """method=joint: one stage over the union of the tasks' data, evaluated on each task (the upper bound)."""
    out = tmp_path / "joint"
    train(1, out, "method=joint", shards=shards)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "joint" and len(metrics["joint_accuracy"]) == 3
    assert metrics["avg_acc"] == pytest.approx(sum(metrics["joint_accuracy"]) / 3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000000-task0-done"]


def test_seq_lora_and_bf16_under_zero3(shards, tmp_path):
    """The seq-LoRA baseline with bf16 weights, 2 processes, ZeRO-3 partitioning every parameter."""
    out = tmp_path / "bf16"
    partition_all = "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"
    train(2, out, "method=seq_lora", "train.precision=bf16", "deepspeed.zero_stage=3", partition_all, shards=shards)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "seq_lora" and [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
    assert metrics["task_incremental_accuracy_matrix"][0][0] > 70


def test_covariance_budget_splits_passes_and_keeps_the_result(runs, shards, tmp_path):
    """2 processes, owner reduction, a per-rank budget that forces one pass per input group: same A, same matrix."""
    out = tmp_path / "budget"
    proc = train(2, out, "inflora.reduce=owner", "inflora.covariance_max_bytes_per_rank=24000", shards=shards)
    assert "covariance pass 2/2" in proc.stdout + proc.stderr
    metrics, state = results(out)
    ref_metrics, ref_state = results(runs(1, 0))
    for name, tensor in state.items():
        if ".A." in name:
            torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-5, msg=name)
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]


def test_covariance_token_budget_reads_the_same_samples_at_any_world_size(runs, shards, tmp_path):
    """inflora.covariance_max_tokens: 1 process and 2 under ZeRO-3 read the same first samples (batches of 16
    rows per rank, so the prefix spans ranks and batches): same A and memories (1e-5), same matrix; 1000 tokens
    of 17-token images are 58 images, and A differs from the full pass's."""
    budget = ["inflora.covariance_max_tokens=1000", "train.eval_batch_size=16"]
    one, two = tmp_path / "p1", tmp_path / "p2"
    proc = train(1, one, *budget, shards=shards)
    assert "covariance: 986 tokens of 58 samples (inflora.covariance_max_tokens=1000)" in proc.stdout + proc.stderr
    train(2, two, *budget, "deepspeed.zero_stage=3", shards=shards)
    (metrics, state), (ref_metrics, ref_state) = results(two), results(one)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-5, msg=name)
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]
    full = results(runs(1, 0))[1]
    assert max(float((state[n] - full[n]).abs().max()) for n in state if ".A." in n) > 1e-3


def test_gradient_checkpointing_under_zero3_changes_no_result(runs, shards, tmp_path):
    """train.gradient_checkpointing under ZeRO-3 on 2 processes (recomputed blocks gather their partitioned
    weights again in the backward): the same A, memories and B (1e-6) and matrices as without it."""
    out = tmp_path / "checkpointed"
    proc = train(2, out, "deepspeed.zero_stage=3", "train.gradient_checkpointing=true", shards=shards)
    logs = proc.stdout + proc.stderr
    assert "activation checkpointing on (reentrant)" in logs
    # Built partitioned: rank 0 holds about half of every backbone parameter (padded to the ranks), no more.
    built = re.search(r"this rank holds (\d+) of the (\d+) elements of (\d+) param", logs)
    held, total, count = map(int, built.groups())
    assert count > 0 and 2 * held <= total + 2 * count
    (metrics, state), (ref_metrics, ref_state) = results(out), results(runs(2, 3))
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=1e-6, atol=1e-6, msg=name)
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]


def test_simple_cil_is_the_prototype_classifier_of_the_frozen_backbone(shards, tmp_path):
    """method=simple_cil trains nothing: its heads are the unit class means, so all heads score as nearest mean."""
    out = tmp_path / "simple_cil"
    train(1, out, "method=simple_cil", shards=shards)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "simple_cil"
    assert metrics["accuracy_matrix"] == metrics["ncm_accuracy_matrix"]
    assert metrics["task_incremental_accuracy_matrix"][2][2] > 50
    assert not (out / "peft_adapter").exists()  # no branch was trained
    tensors = heads_and_statistics(out)
    means = torch.nn.functional.normalize(tensors["stats.means"], dim=-1)
    torch.testing.assert_close(tensors["heads.2.weight"], means[4:6])
    assert not tensors["heads.0.bias"].any()


def _evaluate(nproc: int, run: Path, tasks: Path, out: Path) -> subprocess.CompletedProcess:
    # --run-dir: under torchrun, --run would be taken by torchrun's own parser (an abbreviation of --run-path)
    module = ["-m", "inflora_dist.evaluate", "--run-dir", str(run), "--tasks", str(tasks), "--out", str(out)]
    if nproc == 1:
        args = [sys.executable, *module]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        args = [str(torchrun), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *module]
    return subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("nproc", "stage"), [(1, 0), (2, 3)])
def test_evaluate_scores_a_run_as_its_own_evaluation_did(runs, shards, tmp_path, nproc, stage):
    """`python -m inflora_dist.evaluate` (1 process; torchrun 2 under the run's ZeRO-3) on the run's own tasks gives
    the last row of each of its matrices; on a sequence of one of them, that task's scores."""
    run = runs(nproc, stage)
    proc = _evaluate(nproc, run, shards / "tasks.yaml", tmp_path / "all.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "all.json").read_text())
    metrics = results(run)[0]
    assert result["learned_tasks"] == ["task0", "task1", "task2"] and result["tasks"] == result["learned_tasks"]
    for key, scores in result["scores"].items():
        assert scores == metrics[f"{key}_matrix"][-1], key
    assert result["average"]["accuracy"] == pytest.approx(metrics["avg_acc"])
    # stdout holds the table alone (DeepSpeed's set-up lines go to stderr), on one rank and under torchrun
    assert proc.stdout.splitlines()[0].split() == ["task", *result["scores"]], proc.stdout[:500]
    assert proc.stdout.splitlines()[-1].startswith("average"), proc.stdout[-500:]

    spec = yaml.safe_load((shards / "tasks.yaml").read_text())
    spec["tasks"] = spec["tasks"][1:2]
    one = tmp_path / "task1.yaml"
    one.write_text(yaml.safe_dump(spec))
    assert _evaluate(1, run, one, tmp_path / "one.json").returncode == 0
    result = json.loads((tmp_path / "one.json").read_text())
    assert {k: v[0] for k, v in result["scores"].items()} == {
        k: metrics[f"{k}_matrix"][-1][1] for k in result["scores"]
    }


def test_evaluate_refuses_classes_the_run_has_not_learned(runs, shards, tmp_path):
    spec = yaml.safe_load((shards / "tasks.yaml").read_text())
    learned = [c for t in spec["tasks"] for c in t["classes"]]
    unknown = next(c for c in range(10) if c not in learned)
    spec["tasks"][0]["classes"] = [spec["tasks"][0]["classes"][0], unknown]
    spec["tasks"][0]["class_names"] = None
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    proc = _evaluate(1, runs(1, 0), bad, tmp_path / "bad.json")
    assert proc.returncode != 0
    assert f"tasks[0] ('task0') has classes [{unknown}] that the run has not learned" in proc.stderr, proc.stderr[
        -2000:
    ]


def test_predict_prints_the_class_the_merged_export_predicts(runs, shards, tmp_path):
    """`python -m inflora_dist.predict` on PNG files of eval images: the class name and probability that plain
    transformers computes from the run's merged export (model/, heads.safetensors, classes.json)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoModel

    from inflora_dist.data import load_task_sequence
    from inflora_dist.data.samples import write_sample_images

    paths = [str(p) for p in write_sample_images(load_task_sequence(str(shards / "tasks.yaml")), tmp_path, 3)]
    assert len(paths) == 18 and any("-Trouser-" in p or "-Bag-" in p for p in paths)  # 3 per class, named
    images = [torch.from_numpy(np.asarray(Image.open(p))) for p in paths]
    proc = subprocess.run([sys.executable, "-m", "inflora_dist.predict", "--run", str(runs(1, 0)), *paths],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [line[0] for line in lines] == paths  # stdout holds the results only

    export = runs(1, 0) / "model"
    backbone = AutoModel.from_pretrained(str(export)).eval()
    heads = load_file(str(export / "heads.safetensors"))
    classes = json.loads((export / "classes.json").read_text())
    p = classes["preprocess"]
    x = (torch.stack(images).float().unsqueeze(1) / 255.0 - p["mean"][0]) / p["std"][0]
    with torch.no_grad():
        feats = backbone(pixel_values=x).last_hidden_state[:, 0]
    logits = torch.cat([feats @ heads[f"{t}.weight"].T + heads[f"{t}.bias"] for t in range(3)], dim=1)
    probs, best = torch.softmax(logits, dim=1).max(dim=1)
    assert [line[1] for line in lines] == [classes["class_names"][i] for i in best.tolist()]
    assert "Trouser" in classes["class_names"] or "Bag" in classes["class_names"]  # Fashion-MNIST's own names
    torch.testing.assert_close(torch.tensor([float(line[2]) for line in lines]), probs, rtol=0, atol=1e-4)


def test_export_model_cli_writes_what_the_run_exported(runs, tmp_path):
    """`python -m inflora_dist.export_model` on a finished ZeRO-3 run (here one process): the files the run's own
    export.merged_model wrote, tensor for tensor."""
    run = runs(2, 3)
    args = [sys.executable, "-m", "inflora_dist.export_model", "--run", str(run), "--out", str(tmp_path / "model")]
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for file in ("model.safetensors", "heads.safetensors"):
        ref, got = load_file(str(run / "model" / file)), load_file(str(tmp_path / "model" / file))
        assert sorted(got) == sorted(ref), file
        for name, tensor in got.items():
            assert torch.equal(tensor, ref[name]), name
    for file in ("classes.json", "config.json"):
        assert json.loads((tmp_path / "model" / file).read_text()) == json.loads((run / "model" / file).read_text())
