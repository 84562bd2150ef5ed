"""GainLoRA (method=gainlora): its gate math against the reference's formulas, gated branches, the prompt each gate
reads, and real runs of the tiny Llama (1 process at ZeRO-0 vs 2 at ZeRO-3, a pre-empted run resumed mid-task, a
run extended by a task, the gated export loaded by a fresh process) and the inputs it refuses."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_llama
from trainer_runs import LLM_CONFIG, REPO, env, interrupt_two_processes, llm_demo_shards, predict_prompts, train

from inflora_dist.config import RunConfig, load_run_config, resume_differences, to_dict
from inflora_dist.gates import GateNetwork, GateRouter, PromptTap, TaskGates, gate_values, masked_mean, project_update
from inflora_dist.inject import inject_inflora
from inflora_dist.loop import PREEMPTED_EXIT_CODE
from inflora_dist.methods.gainlora import GainLoRA

# ---------------------------------------------------------------------------------------------- the math


def test_gate_value_is_the_reference_cal_attention():
    """|2 sigmoid(4 cos) - 1| as `cal_attention` computes it (llama_gainlora_inflora.py L837-864), written out."""
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(5, 3, 16, generator=g), torch.randn(3, 16, generator=g)
    xn = x / x.norm(dim=-1, keepdim=True)
    kn = keys / keys.norm(dim=-1, keepdim=True)
    reference = torch.abs(torch.sigmoid((xn * kn).sum(dim=-1) * 4) * 2 - 1)
    torch.testing.assert_close(gate_values(x, keys), reference)
    # orthogonal output and key: the gate is closed; aligned: open to |2 sigmoid(4) - 1|
    e = torch.eye(4)
    assert float(gate_values(e[None, :1], e[1:2])) == 0.0
    assert float(gate_values(e[None, :1], e[:1])) == pytest.approx(2 / (1 + math.exp(-4)) - 1)


def test_the_gate_input_is_each_prompt_s_own_mean():
    """A row's masked mean is the same alone or beside a longer prompt; the reference's `.mean(dim=1)` of the
    zeroed embeddings divides by the padded length and is not (the documented departure, gates.py)."""
    emb = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    batched = masked_mean(emb, mask)
    alone = masked_mean(emb[:1, 3:], mask[:1, 3:])
    torch.testing.assert_close(batched[0], alone[0])
    torch.testing.assert_close(batched[0], emb[0, 3:].mean(0))
    reference = (mask.unsqueeze(-1) * emb).mean(dim=1)  # L947: divides by 6 tokens, the batch's padded length
    assert not torch.allclose(reference[0], alone[0])


def test_a_projected_update_keeps_the_old_inputs_gate_values():
    """After updates projected out of the old subspaces (input, hidden, output), a gate's outputs on old inputs
    are unchanged and the new key stays orthogonal to them: the old inputs' gate value stays 0."""
    g = torch.Generator().manual_seed(2)
    d, h = 12, 5
    net = GateNetwork(d, h, "llama")
    old_inputs = torch.randn(3, 2, generator=g) @ torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T  # rank 2
    with torch.no_grad():
        hidden = net.input(old_inputs)
        outputs = net(old_inputs)
    projector = {}
    for side, acts in (("input", old_inputs), ("hidden", hidden), ("output", outputs)):
        u = torch.linalg.svd(acts.double().T, full_matrices=False)[0][:, : min(acts.shape)]
        projector[side] = u @ u.T
    key = torch.randn(d, generator=g)
    key = project_update(key, torch.zeros_like(key), projector["output"])  # as prepare_stage draws it
    assert float(gate_values(outputs[:, None], key[None]).abs().max()) < 1e-6
    with torch.no_grad():
        for p, side in ((net.input.weight, "input"), (net.hidden.weight, "hidden")):
            before = p.clone()
            p.add_(torch.randn(p.shape, generator=g))
            p.copy_(project_update(p, before, projector[side]))
        new_key = project_update(key + torch.randn(d, generator=g), key, projector["output"])
        torch.testing.assert_close(net(old_inputs), outputs, rtol=0, atol=1e-5)
    assert float(gate_values(outputs[:, None], new_key[None]).abs().max()) < 1e-5
    assert project_update(key, key * 0, None) is key  # nothing protected before the first task


def test_gated_layers_weigh_each_branch_per_row():
    """y = W x + sum_t g[n, t] s B_t A_t x for every row n, with the layer's scaling s."""
    model = tiny_llama()
    report = inject_inflora(model, ["q_proj"], 2, 3, fold="stack", scaling=4.0)
    layer = next(iter(report.layers.values()))
    g = torch.Generator().manual_seed(3)
    for t in range(2):
        layer.start_task(t, torch.randn(2, layer.in_features, generator=g))
        with torch.no_grad():
            layer.lora_B(t).copy_(torch.randn(layer.out_features, 2, generator=g))
        layer.finish_task()
    x = torch.randn(2, 5, layer.in_features, generator=g)
    layer.gates = torch.tensor([[0.2, 0.7, 0.0], [1.0, 0.0, 0.0]])
    with torch.no_grad():
        got = layer(x)
        want = layer.base_layer(x)
        for n in range(2):
            for t in range(2):
                delta = 4.0 * (x[n] @ layer.lora_A[t].T) @ layer.lora_B(t).T
                want[n] += layer.gates[n, t] * delta
    torch.testing.assert_close(got, want)
    layer.gates = torch.ones(3, 3)
    with pytest.raises(ValueError, match="gates for 3 rows, but the input has 2"):
        layer(x)


def _gated_tiny_llama():
    model = tiny_llama()
    report = inject_inflora(model, ["q_proj", "v_proj"], 2, 2, fold="stack")
    g = torch.Generator().manual_seed(4)
    for layer in report.layers.values():
        layer.start_task(0, torch.randn(2, layer.in_features, generator=g))
        with torch.no_grad():
            layer.lora_B(0).copy_(torch.randn(layer.out_features, 2, generator=g))
        layer.finish_task()
    gates = TaskGates(32, 5, 2, "llama", seed=0)
    tap = PromptTap(model)
    GateRouter(gates, list(report.layers.values()), tap)  # its hooks keep it
    return model, report, gates, tap


def test_the_gate_reads_the_prompt_once_per_generation():
    """Generation: the gates come from the prompt's tokens (left padding masked) at the first step and hold for
    the cached steps; a training sequence marked with its prompt gets the prompt's gates, not the response's."""
    model, report, gates, tap = _gated_tiny_llama()
    layer = next(iter(report.layers.values()))
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.gates))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        xbar = masked_mean(model.get_input_embeddings()(ids), mask)
        expected = gates.values(xbar, [0])
    assert len(seen) == 3 and all(s is seen[0] for s in seen)  # computed once, at the prompt
    torch.testing.assert_close(seen[0][:, :1], expected)
    # A training sequence: prompt (4 tokens) and response (2): the marked prompt's gates.
    full = torch.cat([ids, torch.randint(1, VOCAB, (2, 2))], dim=1)
    prompt = torch.cat([mask, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    with torch.no_grad(), tap.marked(prompt):
        model(input_ids=full, attention_mask=torch.ones_like(full))
    torch.testing.assert_close(layer.gates[:, :1], expected)


def test_a_t5_gate_reads_the_encoder_s_input_once():
    """T5: the gate reads the encoder's input (its own embedding lookup), once per generation; the decoder's
    steps keep it."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                d_kv=8, decoder_start_token_id=0, pad_token_id=0)).eval()  # fmt: skip
    report = inject_inflora(model, ["SelfAttention.q", "SelfAttention.v"], 2, 1, fold="stack")
    for layer in report.layers.values():
        layer.start_task(0, torch.randn(2, layer.in_features))
    gates = TaskGates(16, 4, 1, "t5", seed=0)
    GateRouter(gates, list(report.layers.values()), PromptTap(model.get_encoder()))
    decoder_layer = next(layer for name, layer in report.layers.items() if name.startswith("decoder."))
    seen = []
    decoder_layer.register_forward_pre_hook(lambda m, a: seen.append(m.gates))
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        expected = gates.values(masked_mean(model.get_encoder().get_input_embeddings()(ids), mask), [0])
    assert len(seen) >= 2 and all(s is seen[0] for s in seen)
    torch.testing.assert_close(seen[0], expected)


# ---------------------------------------------------------------------------------------------- bad input
def _config(*overrides: str, tmp_path: Path) -> RunConfig:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks: []\n")
    return load_run_config([str(LLM_CONFIG)], [f"data.tasks={tasks}", "method=gainlora", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.kind=vit"], "method=gainlora gates each task's branch by the prompt's token embeddings: it needs a "
                             "language model"),
        (["gainlora.gate_hidden=0"], "gainlora.gate_hidden must be an integer >= 1, got 0"),
        (["gainlora.gate_architecture=mlp"], "gainlora.gate_architecture must be one of"),
        (["gainlora.branches=seq_lora"], "gainlora.branches must be one of"),
        (["export.merged_model=true"], "export.merged_model=true with method=gainlora: a merged model"),
    ],
    ids=["image model", "gate size 0", "gate architecture", "branches", "merged export"],
)  # fmt: skip
def test_what_gainlora_cannot_do_is_refused_naming_the_key(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("=", "=")):
        _config(*overrides, tmp_path=tmp_path)


def test_a_resume_with_another_gate_is_named(tmp_path):
    saved = to_dict(_config(tmp_path=tmp_path))
    now = to_dict(_config("gainlora.gate_architecture=t5", "gainlora.gate_hidden=100", tmp_path=tmp_path))
    assert resume_differences(saved, now) == [
        "gainlora.gate_architecture: 'auto' -> 't5'",
        "gainlora.gate_hidden: 50 -> 100",
    ]


# ---------------------------------------------------------------------------------------------- real runs
ZERO3 = ["deepspeed.zero_stage=3", "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
GAINLORA = ["method=gainlora", "inflora.planned_tasks=3", "checkpoint.every_steps=1", "checkpoint.keep=20"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return llm_demo_shards(tmp_path_factory.mktemp("gainlora") / "shards")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """Finished GainLoRA runs of the tiny Llama: 1 process at ZeRO-0, 2 processes at ZeRO-3."""
    root = tmp_path_factory.mktemp("gainlora_runs")
    done: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in done:
            out = root / f"p{nproc}"
            train(nproc, out, *GAINLORA, *(ZERO3 if nproc == 2 else []), shards=shards, config=LLM_CONFIG)
            done[nproc] = out
        return done[nproc]

    return get


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    last = max((out / "checkpoints").glob("*-task2-done"))
    return load_file(str(last / "state.safetensors"))


def _assert_states_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(got) == sorted(ref)
    assert any(k.startswith("method.gates.") for k in ref) and any(k.startswith("method.gate_memory.") for k in ref)
    for name, tensor in got.items():
        if tensor.dtype.is_floating_point:
            torch.testing.assert_close(tensor, ref[name], rtol=0, atol=atol, msg=name)


def test_two_processes_under_zero3_reproduce_one_process(runs):
    """Gates, keys, branches and every subspace at 2 ranks under ZeRO-3 are the 1-process run's (1e-5); so are
    the accuracy matrix and the gate matrix, which holds each branch's mean gate on every task's prompts."""
    one, two = runs(1), runs(2)
    _assert_states_equal(_final_state(two), _final_state(one), 1e-5)
    m1, m2 = (json.loads((out / "metrics.json").read_text()) for out in (one, two))
    assert m1["method"] == "gainlora" and m2["accuracy_matrix"] == m1["accuracy_matrix"]
    gates = m1["gate_matrix"]
    assert [[len(v) for v in row] for row in gates] == [[1], [2, 2], [3, 3, 3]]
    torch.testing.assert_close(torch.tensor(m2["gate_matrix"][-1]), torch.tensor(gates[-1]), rtol=0, atol=1e-5)
    assert all(0.0 <= v < 1.0 for row in gates for task in row for v in task)
    # the exports: a gated model, no PEFT adapter (it cannot carry the gates)
    assert (one / "gated_model" / "gated_model.json").exists() and not (one / "peft_adapter").exists()


def test_preempted_mid_task_resumes_exactly(runs, shards, tmp_path):
    """SIGUSR1 to a 2-rank ZeRO-3 run mid-task 1: exit 75 after a checkpoint; resume=auto ends where the
    uninterrupted run ends (gates and their optimizer state resumed with the engine's)."""
    out = tmp_path / "run"
    overrides = [f"data.tasks={shards}/tasks.yaml", *GAINLORA, *ZERO3]
    log = interrupt_two_processes(overrides, out, signal.SIGUSR1, checkpoint="*-task1-step1", config=LLM_CONFIG)
    names = [p.name for p in (out / "checkpoints").iterdir()]
    assert any(n.endswith("-preempted") for n in names) and not any("task2" in n for n in names), names
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in log or f"exit code {PREEMPTED_EXIT_CODE}" in log, log[-3000:]
    train(2, out, *GAINLORA, *ZERO3, "resume=auto", shards=shards, config=LLM_CONFIG)
    _assert_states_equal(_final_state(out), _final_state(runs(2)), 1e-6)
    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (runs(2), out))
    assert m2["accuracy_matrix"] == m1["accuracy_matrix"] and m2["gate_matrix"] == m1["gate_matrix"]


def test_a_run_extended_by_a_task_equals_the_whole_run(runs, shards, tmp_path):
    """Two tasks, then the third added (resume=auto on the longer sequence): the 3-task run's state."""
    spec = yaml.safe_load((shards / "tasks.yaml").read_text())
    spec["root"], spec["tasks"] = str(shards), spec["tasks"][:2]
    two_tasks = tmp_path / "two.yaml"
    two_tasks.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    train(1, out, *GAINLORA, shards=shards, config=LLM_CONFIG, tasks_file=two_tasks)
    train(1, out, *GAINLORA, shards=shards, config=LLM_CONFIG)
    _assert_states_equal(_final_state(out), _final_state(runs(1)), 1e-6)


def test_the_gated_export_loads_in_one_call_and_answers_as_the_run(runs, shards, tmp_path):
    """A fresh process loads gated_model/ with one call and generates what `predict` answers from the run's own
    checkpoint; `evaluate` reports the gates the run logged; export_model refuses the run in one line (a merged
    model cannot carry the gates)."""
    run = runs(1)
    evaluation = tmp_path / "evaluation.json"
    proc = subprocess.run([sys.executable, "-m", "inflora_dist.evaluate", "--run", str(run), "--tasks",
                           str(shards / "tasks.yaml"), "--out", str(evaluation)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads((run / "metrics.json").read_text())["gate_matrix"][-1]
    assert json.loads(evaluation.read_text())["gates"] == logged
    prompts = ["Which language is this line in: ciao, come stai?", "What is the topic of: who wrote the odyssey?"]
    expected = [r["answer"] for r in predict_prompts(run, prompts, tmp_path, max_new_tokens=6)]
    script = (
        "import json, sys\n"
        "from inflora_dist.gated import load_gated_model\n"
        "from inflora_dist.data.text import collate_prompts\n"
        "model, tok = load_gated_model(sys.argv[1])\n"
        "rows = [{'prompt': p} for p in json.loads(sys.argv[2])]\n"
        "batch = collate_prompts(tok, rows, 96)\n"
        "out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)\n"
        "print(json.dumps(tok.batch_decode(out[:, batch['input_ids'].shape[1]:], skip_special_tokens=True)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(run / "gated_model"), json.dumps(prompts)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == expected
    refused = subprocess.run([sys.executable, "-m", "inflora_dist.export_model", "--run", str(run), "--out",
                              str(tmp_path / "merged")], cwd=REPO, env=env(), capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert refused.returncode == 2 and not (tmp_path / "merged").exists()
    last = refused.stderr.strip().splitlines()[-1]
    assert ": error: ValueError: " in last and "method=gainlora run" in last and "gated_model" in last, last


def test_the_gate_module_s_init_is_the_same_on_every_rank():
    """Gates and keys drawn from the run's seed: two builds agree, another seed differs (no rank-local RNG)."""
    a, b, c = (TaskGates(8, 3, 2, "t5", seed=s) for s in (0, 0, 1))
    for (name, x), (_, y), (_, z) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items(),
                                         strict=True):  # fmt: skip
        assert torch.equal(x, y) and not torch.equal(x, z), name
    assert GainLoRA.adapter_export is False and GainLoRA.exports == ("gated_model",)


def test_olora_branches_train_their_a_under_the_gates(shards, tmp_path):
    """gainlora.branches=olora (the paper's other variant) at ZeRO-2: A and B train, the gates weigh them, and
    the gate subspaces grow from a pass of their own (O-LoRA runs none after a task)."""
    out = tmp_path / "run"
    proc = train(1, out, "method=gainlora", "gainlora.branches=olora", "deepspeed.zero_stage=2", shards=shards,
                 config=LLM_CONFIG)  # fmt: skip
    assert "stage 2 gate subspaces" in proc.stderr
    state = _final_state(out)
    a = next(v for k, v in state.items() if k.endswith("q_proj.lora_A"))
    bound = a.shape[-1] ** -0.5  # O-LoRA's kaiming-uniform start; training moves A beyond it
    assert a.shape[0] == 3 and float(a.abs().max()) > bound
    assert [len(v) for v in json.loads((out / "metrics.json").read_text())["gate_matrix"][-1]] == [3, 3, 3]
