"""Exports: the continual state (safetensors + JSON) and the PEFT LoRA adapter, reloaded by peft itself."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_covariance import covariance_pass, make_batches
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_vit

from inflora_dist.continual import InfLoRA
from inflora_dist.export import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    export_classifier_heads,
    export_continual_state,
    export_merged_model,
    export_peft_adapter,
    sidecar_path,
)
from inflora_dist.inject import InjectionReport, inject_inflora
from inflora_dist.layer import TRAINING

peft = pytest.importorskip("peft")

IDS = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(2, 9, dtype=torch.long)
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

CASES = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),  # transformers Conv1D: fan_in_fan_out
    "vit": (tiny_vit, ["q_proj", "k_proj", "v_proj", "fc1"]),
}
RANK = 2


def run(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if model.main_input_name == "pixel_values":
            return model(pixel_values=PIXELS).last_hidden_state
        return model(input_ids=IDS, attention_mask=MASK).logits


def random_a(rank: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """Orthonormal rows scaled by 1/sqrt(3), as the designed A."""
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))
    return q.T / math.sqrt(3.0)


def fake_task(report: InjectionReport, task_id: int, g: torch.Generator, finish: bool = True, groups=None) -> None:
    """Start `task_id` on every layer of `groups` (all by default) with one A per group, fill B, maybe finish."""
    for group in groups or report.groups:
        a = random_a(RANK, report.dims[group], g)
        for layer in report.group_modules(group):
            layer.start_task(task_id, a)
            b = layer.lora_B(task_id)
            b.data.copy_(torch.randn(b.shape, generator=g) * 0.3)
            if finish:
                layer.finish_task()


def load_peft(pristine: torch.nn.Module, directory) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(pristine, str(directory)).eval()


@pytest.mark.parametrize("mid_task", [False, True], ids=["finished", "mid-task"])
@pytest.mark.parametrize("fold", ["merge", "stack"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_peft_reproduces_the_model(tmp_path, family, fold, mid_task):
    """PEFT, loading the export onto the original weights, computes what the InfLoRA model computes."""
    build, targets = CASES[family]
    model = build()
    pristine = copy.deepcopy(model)
    original = run(model)
    report = inject_inflora(model, targets, rank=RANK, num_tasks=4, fold=fold)
    g = torch.Generator().manual_seed(3)
    fake_task(report, 0, g)
    fake_task(report, 1, g)
    fake_task(report, 2, g, finish=not mid_task)
    layer = next(iter(report.layers.values()))
    assert (layer.status(2) == TRAINING) == mid_task
    expected = run(model)
    assert (expected - original).abs().max() > 1e-2, "the adapter must change the outputs"

    export_peft_adapter(model, report, tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert config["r"] == config["lora_alpha"] == 3 * RANK
    assert config["fan_in_fan_out"] is (family == "gpt2")
    assert config["target_modules"] == sorted(report.layers)
    loaded = load_peft(pristine, tmp_path)
    torch.testing.assert_close(run(loaded), expected, rtol=1e-5, atol=1e-5)
    # PEFT's merge transposes the delta by fan_in_fan_out: the flag must be right for Conv1D.
    torch.testing.assert_close(run(loaded.merge_and_unload()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_files_match_what_peft_saves(tmp_path, family):
    """Key names, shapes, dtypes and config fields agree with PEFT's own save_pretrained."""
    build, targets = CASES[family]
    model = build()
    pristine = copy.deepcopy(model)
    report = inject_inflora(model, targets, rank=RANK, num_tasks=3)
    g = torch.Generator().manual_seed(0)
    fake_task(report, 0, g)
    fake_task(report, 1, g)
    ours = tmp_path / "ours"
    export_peft_adapter(model, report, ours, base_model_name_or_path="tiny/base")

    fan_in_fan_out = family == "gpt2"
    reference = peft.LoraConfig(
        r=2 * RANK, lora_alpha=2 * RANK, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out
    )
    theirs = tmp_path / "theirs"
    peft.get_peft_model(pristine, reference).save_pretrained(str(theirs))
    mine, ref = load_file(str(ours / PEFT_WEIGHTS_NAME)), load_file(str(theirs / PEFT_WEIGHTS_NAME))
    assert sorted(mine) == sorted(ref)
    for key, tensor in mine.items():
        assert tensor.shape == ref[key].shape and tensor.dtype == ref[key].dtype, key
        assert tensor.is_contiguous()

    loaded = peft.LoraConfig.from_pretrained(str(ours))
    assert loaded.peft_type == peft.PeftType.LORA
    assert set(loaded.target_modules) == set(report.layers)
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout, loaded.bias) == (2 * RANK, 2 * RANK, 0.0, "none")
    assert loaded.fan_in_fan_out is fan_in_fan_out and loaded.use_rslora is False
    assert loaded.base_model_name_or_path == "tiny/base"


def test_task_type_picks_the_peft_model_class(tmp_path):
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    report = inject_inflora(model, ["q_proj", "v_proj"], rank=RANK, num_tasks=2)
    fake_task(report, 0, torch.Generator().manual_seed(1))
    export_peft_adapter(model, report, tmp_path / "plain")
    export_peft_adapter(model, report, tmp_path / "causal", task_type="CAUSAL_LM")
    assert type(load_peft(copy.deepcopy(pristine), tmp_path / "plain")) is peft.PeftModel
    causal = load_peft(pristine, tmp_path / "causal")
    assert isinstance(causal, peft.PeftModelForCausalLM)
    torch.testing.assert_close(run(causal), run(model), rtol=1e-5, atol=1e-5)


def test_layers_with_different_task_counts_use_rank_pattern(tmp_path):
    """A group that started fewer tasks gets its own r through rank_pattern / alpha_pattern."""
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    report = inject_inflora(model, ["q_proj", "k_proj", "v_proj", "down_proj"], rank=RANK, num_tasks=3, fold="merge")
    g = torch.Generator().manual_seed(5)
    fake_task(report, 0, g)
    down = [grp for grp in report.groups if grp.endswith("down_proj")]
    fake_task(report, 1, g, groups=[grp for grp in report.groups if grp not in down])
    export_peft_adapter(model, report, tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert config["r"] == 2 * RANK
    assert set(config["rank_pattern"].values()) == {RANK} and len(config["rank_pattern"]) == len(down)
    assert config["alpha_pattern"] == config["rank_pattern"]
    torch.testing.assert_close(run(load_peft(pristine, tmp_path)), run(model), rtol=1e-5, atol=1e-5)


def test_peft_export_errors(tmp_path):
    model = tiny_gpt2()
    report = inject_inflora(model, ["c_attn"], rank=RANK, num_tasks=2)
    with pytest.raises(ValueError, match="no task has been started"):
        export_peft_adapter(model, report, tmp_path)
    mixed = tiny_gpt2()
    report = inject_inflora(mixed, ["c_attn", "lm_head"], rank=RANK, num_tasks=2)  # Conv1D and nn.Linear
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        export_peft_adapter(mixed, report, tmp_path)
    assert not list(tmp_path.iterdir())


LAMBDAS = (0.95, 0.999)  # high enough that the first group stores its free space ("retain")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def continual_run(tasks: int, start_next: bool) -> tuple[torch.nn.Module, InfLoRA]:
    """Real covariance passes, designed A, fake-trained B, DualGPM updates, for `tasks` tasks."""
    model = tiny_llama()
    inflora = InfLoRA(inject_inflora(model, TARGETS, rank=RANK, num_tasks=3), LAMBDAS[0], LAMBDAS[1])
    g = torch.Generator().manual_seed(11)
    for t in range(tasks + int(start_next)):
        batches = make_batches(n_batches=4, seed=20 + t)
        covariance_pass(model, inflora, batches)
        inflora.on_task_start(t)
        for layer in inflora.report.layers.values():
            layer.lora_B(t).data.copy_(torch.randn(layer.lora_B(t).shape, generator=g) * 0.3)
        if t < tasks:
            covariance_pass(model, inflora, batches)
            inflora.on_task_end(t)
    return model, inflora


@pytest.mark.parametrize("start_next", [False, True], ids=["two-finished", "third-training"])
def test_continual_state_round_trip(tmp_path, start_next):
    _, inflora = continual_run(2, start_next)
    path = tmp_path / "state" / "continual_state.safetensors"
    export_continual_state(inflora, path, task_names=["cifar-a", "cifar-b", "cifar-c"])
    tensors = load_file(str(path))
    sidecar = json.loads((tmp_path / "state" / "continual_state.json").read_text())
    assert sidecar_path(path) == tmp_path / "state" / "continual_state.json"

    started = [0, 1, 2] if start_next else [0, 1]
    report = inflora.report
    expected_names = {f"{g}.A.{t}" for g in report.groups for t in started} | {f"{g}.old_basis" for g in report.groups}
    assert set(tensors) == expected_names
    modes = set()
    for group, members in report.groups.items():
        memory = inflora.memories[group]
        d = report.dims[group]
        for t in started:
            a = tensors[f"{group}.A.{t}"]
            assert a.shape == (RANK, d) and a.dtype == torch.float32
            for name in members:
                torch.testing.assert_close(a, report.layers[name].lora_A[t], rtol=0, atol=0)
        old = tensors[f"{group}.old_basis"]
        assert old.dtype == torch.float64 and old.shape == (d, memory.protected_dim)
        assert 0 < memory.protected_dim < d
        torch.testing.assert_close(old, memory.old_basis(), rtol=0, atol=0)
        torch.testing.assert_close(old.T @ old, torch.eye(old.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)

        entry = sidecar["groups"][group]
        modes.add(entry["mode"])
        assert entry["mode"] == memory.mode
        assert (entry["dim"], entry["protected_dim"]) == (d, memory.protected_dim)
        assert entry["old_basis_shape"] == [d, memory.protected_dim]
        assert (entry["lambda_begin"], entry["lambda_end"]) == LAMBDAS
        lb, le = LAMBDAS
        assert entry["thresholds"] == pytest.approx([lb + (le - lb) * t / 3 for t in range(3)])
        assert entry["members"] == members
        assert entry["started_tasks"] == started
    assert modes == {"remove", "retain"}, "the run should exercise both DualGPM storage modes"
    assert sidecar["task_names"] == ["cifar-a", "cifar-b", "cifar-c"]
    assert sidecar["num_finished_tasks"] == 2
    assert sidecar["task_status"] == ["merged", "merged", "training" if start_next else "unused"]
    assert (sidecar["rank"], sidecar["num_tasks"]) == (RANK, 3)


def test_continual_state_defaults_and_errors(tmp_path):
    _, inflora = continual_run(1, start_next=False)
    export_continual_state(inflora, tmp_path / "s.safetensors")
    assert json.loads((tmp_path / "s.json").read_text())["task_names"] == ["task_0"]
    with pytest.raises(ValueError, match="task_names"):
        export_continual_state(inflora, tmp_path / "t.safetensors", task_names=[])
    with pytest.raises(ValueError, match="task_names"):
        export_continual_state(inflora, tmp_path / "t.safetensors", task_names=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="sidecar"):
        export_continual_state(inflora, tmp_path / "t.json")

    # Before any task: no A, and empty (d, 0) old-task bases, which safetensors stores.
    fresh = InfLoRA(inject_inflora(tiny_llama(), ["q_proj"], rank=RANK, num_tasks=2), 0.9, 0.99)
    export_continual_state(fresh, tmp_path / "empty.safetensors")
    tensors = load_file(str(tmp_path / "empty.safetensors"))
    expected = {f"model.layers.{i}.self_attn.q_proj.old_basis": (32, 0) for i in range(2)}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected


@pytest.mark.parametrize("fold", ["merge", "stack"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_merged_export_loads_in_plain_transformers(tmp_path, family, fold):
    """W + sum B_t A_t written as a transformers checkpoint: `from_pretrained` alone computes our outputs."""
    from transformers import AutoModel, AutoModelForCausalLM

    build, targets = CASES[family]
    model = build()
    report = inject_inflora(model, targets, rank=RANK, num_tasks=4, fold=fold)
    g = torch.Generator().manual_seed(5)
    fake_task(report, 0, g)
    fake_task(report, 1, g)
    fake_task(report, 2, g, finish=False)  # mid-task: the active branch is part of the model too
    expected = run(model)
    export_merged_model(model, report, tmp_path / "model")
    names = set(load_file(str(tmp_path / "model" / "model.safetensors")))
    assert not any("lora" in n or "base_layer" in n or "task_status" in n for n in names)
    auto = AutoModel if family == "vit" else AutoModelForCausalLM
    loaded = auto.from_pretrained(str(tmp_path / "model")).eval()
    torch.testing.assert_close(run(loaded), expected, rtol=1e-5, atol=1e-5)


def test_merged_vision_export_reproduces_class_incremental_predictions(tmp_path):
    """Backbone (plain AutoModel) + heads.safetensors + classes.json give the classifier's predictions exactly."""
    from transformers import AutoModel

    from inflora_dist.config import ModelConfig
    from inflora_dist.models import ContinualClassifier

    cfg = ModelConfig(image_size=16, channels=3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    model = ContinualClassifier(tiny_vit(), [2, 3], cfg).eval()
    report = inject_inflora(model, ["q_proj", "k_proj", "v_proj"], rank=RANK, num_tasks=2)
    g = torch.Generator().manual_seed(2)
    fake_task(report, 0, g)
    fake_task(report, 1, g)
    images = torch.randint(0, 256, (12, 20, 20, 3), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        expected = model(images, upto=1).argmax(dim=1)
    out = tmp_path / "model"
    export_merged_model(model, report, out, prefix="backbone.")
    preprocess = {"image_size": 16, "channels": 3, "mean": cfg.mean, "std": cfg.std}
    export_classifier_heads(model.heads, out, [7, 3, 9, 1, 4], [0, 2, 5], ["t0", "t1"], preprocess)

    backbone = AutoModel.from_pretrained(str(out)).eval()
    heads = load_file(str(out / "heads.safetensors"))
    classes = json.loads((out / "classes.json").read_text())
    assert classes["class_ids"] == [7, 3, 9, 1, 4] and classes["tasks"][1] == {"name": "t1", "logits": [2, 5]}
    p = classes["preprocess"]
    x = images.float().permute(0, 3, 1, 2) / 255.0
    x = torch.nn.functional.interpolate(x, size=(p["image_size"],) * 2, mode="bilinear", antialias=True)
    x = (x - torch.tensor(p["mean"]).view(1, -1, 1, 1)) / torch.tensor(p["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        feats = backbone(pixel_values=x).last_hidden_state[:, 0]
    logits = torch.cat([feats @ heads[f"{t}.weight"].T + heads[f"{t}.bias"] for t in range(2)], dim=1)
    assert torch.equal(logits.argmax(dim=1), expected)
