"""O-LoRA through the Method interface: its loss terms against O-LoRA's own formulas, its exports, and real
runs (1 vs 2 processes under ZeRO-3, a pre-empted run resumed mid-task, a language model)."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_llama
from trainer_runs import LLM_CONFIG, interrupt_two_processes, llm_demo_shards, tiny_shards, train

from inflora_dist.config import RunConfig
from inflora_dist.continual import finish_branches
from inflora_dist.data.build_shards import FASHION_MNIST_DIR
from inflora_dist.inject import inject_inflora
from inflora_dist.loop import PREEMPTED_EXIT_CODE
from inflora_dist.methods.olora import OLoRA, l2_penalty, orthogonality_penalty

IDS = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj"]  # O-LoRA's


def olora_model(lambda_1: float = 0.5, lambda_2: float = 0.1, tasks: int = 3):
    """A tiny Llama with O-LoRA branches (rank 2, lora_alpha 8: scaling 4) and its method."""
    cfg = RunConfig(method="olora")
    cfg.inflora.rank, cfg.olora.lora_alpha = 2, 8.0
    cfg.olora.lambda_1, cfg.olora.lambda_2 = lambda_1, lambda_2
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    report = inject_inflora(model, TARGETS, 2, tasks, **OLoRA.layer_options(cfg))
    return model, pristine, OLoRA(cfg, report, workload=None)


def start(method: OLoRA, task: int, g: torch.Generator) -> None:
    """Start `task` as the trainer does, then give A and B values as training would."""
    method.prepare_stage(task)
    with torch.no_grad():
        for layer in method.report.layers.values():
            layer.lora_A_active.add_(torch.randn(layer.lora_A_active.shape, generator=g) * 0.1)
            layer.lora_B(task).copy_(torch.randn(layer.lora_B(task).shape, generator=g) * 0.1)


def test_loss_terms_are_olora_s_own():
    """Task 2's terms equal the reference's loops (uie_trainer_lora.py), written out here on the layers' tensors:
    the old tasks' A stacked as its `lora_A`, the new A and B as `loranew_A` / `loranew_B`; same gradients."""
    model, _, method = olora_model()
    g = torch.Generator().manual_seed(1)
    for task in (0, 1):
        start(method, task, g)
        model(input_ids=IDS)
        finish_branches(method.report)
    start(method, 2, g)
    model.train()
    model(input_ids=IDS)
    terms = method.loss_terms()

    orthogonal, l2 = 0.0, 0.0
    for layer in method.report.layers.values():
        lora_a = torch.cat([layer.lora_A[0], layer.lora_A[1]])  # the reference's concatenated old A
        loranew_a, loranew_b = layer.lora_A_active, layer.lora_B(2)
        orthogonal += torch.abs(torch.mm(lora_a, loranew_a.T)).sum()
        l2 += torch.norm(loranew_a, p=2) + torch.norm(loranew_b, p=2)
    direct = orthogonal * 0.5 + l2 * 0.1
    torch.testing.assert_close(terms, direct, rtol=1e-6, atol=0)
    assert float(orthogonal.detach()) > 0.1 and float(l2.detach()) > 0.1
    params = [p for layer in method.report.layers.values() for p in (layer.lora_A_active, layer.lora_B(2))]
    got = torch.autograd.grad(terms, params, retain_graph=True)
    want = torch.autograd.grad(direct, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The pure functions on small tensors.
    old, new = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[3.0, 1.0]])
    assert float(orthogonality_penalty(old, new)) == pytest.approx(abs(3 - 2) + abs(1.5))
    assert float(l2_penalty(new, old)) == pytest.approx(10**0.5 + 5.25**0.5)


def test_first_task_and_zero_weights_add_nothing():
    """No old A on task 0: only the L2 term; with both lambdas 0 there are no terms at all."""
    model, _, method = olora_model(lambda_2=0.0)
    start(method, 0, torch.Generator().manual_seed(2))
    model(input_ids=IDS)
    assert method.loss_terms() is None
    model, _, method = olora_model(lambda_1=0.5, lambda_2=0.2)
    start(method, 0, torch.Generator().manual_seed(2))
    model(input_ids=IDS)
    layers = method.report.layers.values()
    expected = sum(0.2 * (layer.lora_A_active.norm() + layer.lora_B(0).norm()) for layer in layers)
    torch.testing.assert_close(method.loss_terms(), expected)


@pytest.mark.parametrize("mid_task", [False, True], ids=["finished", "mid-task"])
def test_peft_and_merged_exports_carry_the_trained_a_and_the_scaling(tmp_path, mid_task):
    """The trained A (the parameter while its task trains) and lora_alpha / r reach PEFT and the merged weights."""
    peft = pytest.importorskip("peft")
    from inflora_dist.export import export_merged_model, export_peft_adapter

    model, pristine, method = olora_model()
    g = torch.Generator().manual_seed(3)
    for task in (0, 1):
        start(method, task, g)
        if task == 0 or not mid_task:
            finish_branches(method.report)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        assert (expected - pristine(input_ids=IDS).logits).abs().max() > 1e-3
    export_peft_adapter(model, method.report, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    if not mid_task:
        export_merged_model(model, method.report, tmp_path / "merged")
        merged = type(pristine).from_pretrained(tmp_path / "merged").eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- real runs
needs_fashion_mnist = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(), reason="Fashion-MNIST is not installed")
ZERO3 = ["deepspeed.zero_stage=3", "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
OLORA = ["method=olora", "olora.lambda_2=0.01", "checkpoint.every_steps=3", "checkpoint.keep=20"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("tiny") / "shards")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """Finished O-LoRA runs of the tiny ViT: 1 process at ZeRO 0, 2 processes at ZeRO-3."""
    root = tmp_path_factory.mktemp("olora")
    done: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in done:
            out = root / f"p{nproc}"
            train(nproc, out, *OLORA, *(ZERO3 if nproc == 2 else []), "export.merged_model=true", shards=shards)
            done[nproc] = out
        return done[nproc]

    return get


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "peft_adapter" / "adapter_model.safetensors"))


@needs_fashion_mnist
def test_two_processes_under_zero3_reproduce_one_process(runs):
    """The trained A and B of every task (the PEFT adapter), the heads and the merged model at 2 ranks under
    ZeRO-3 are the 1-process run's (1e-5), and so are the accuracy matrices."""
    one, two = runs(1), runs(2)
    ref, got = _adapter(one), _adapter(two)
    assert sorted(got) == sorted(ref) and any("lora_A" in k for k in got)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, ref[name], rtol=1e-5, atol=1e-5, msg=name)
    for file in ("model.safetensors", "heads.safetensors"):
        a, b = load_file(str(one / "model" / file)), load_file(str(two / "model" / file))
        for name, tensor in b.items():
            torch.testing.assert_close(tensor, a[name], rtol=1e-5, atol=1e-5, msg=name)
    m1, m2 = (json.loads((out / "metrics.json").read_text()) for out in (one, two))
    assert m1["method"] == "olora" and [len(r) for r in m1["accuracy_matrix"]] == [1, 2, 3]
    for key in ("accuracy_matrix", "task_incremental_accuracy_matrix", "ncm_accuracy_matrix"):
        assert m2[key] == m1[key], key
    # A trains: task 1's exported A is not its kaiming-uniform draw (bound 1/sqrt(d_in) = 1/sqrt(32)).
    a = next(v for k, v in ref.items() if k.endswith("k_proj.lora_A.weight"))
    assert a.shape == (12, 32) and a.abs().max() > 32**-0.5


@needs_fashion_mnist
def test_preempted_mid_task_resumes_exactly(runs, shards, tmp_path):
    """SIGUSR1 to a 2-rank ZeRO-3 O-LoRA run mid-task 1: exit 75 after a checkpoint; resume=auto ends where the
    uninterrupted run ends (adapter, matrices)."""
    out = tmp_path / "run"
    overrides = [f"data.tasks={shards}/tasks.yaml", *OLORA, *ZERO3, "export.merged_model=true"]
    log = interrupt_two_processes(overrides, out, signal.SIGUSR1)
    names = [p.name for p in (out / "checkpoints").iterdir()]
    assert any(n.endswith("-preempted") for n in names) and not any("task2" in n for n in names), names
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in log or f"exit code {PREEMPTED_EXIT_CODE}" in log, log[-3000:]
    train(2, out, *OLORA, *ZERO3, "export.merged_model=true", "resume=auto", shards=shards)
    ref, got = _adapter(runs(2)), _adapter(out)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=1e-6, msg=name)
    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (runs(2), out))
    assert m2["accuracy_matrix"] == m1["accuracy_matrix"]


def test_language_model_learns_with_olora(tmp_path):
    """A tiny Llama learns the demo's instruction tasks with O-LoRA at ZeRO-2 and exports its adapter."""
    shards = llm_demo_shards(tmp_path / "shards")
    out = tmp_path / "run"
    train(1, out, "method=olora", "inflora.targets=[q_proj,v_proj]", "deepspeed.zero_stage=2", shards=shards,
          config=LLM_CONFIG)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "olora" and [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
    adapter = _adapter(out)
    assert {k.rsplit(".", 3)[-3] for k in adapter} == {"q_proj", "v_proj"}
    assert not (out / "continual_state.safetensors").exists()  # no subspace memory to export
