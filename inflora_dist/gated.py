"""A GainLoRA run's model as one folder that a fresh process loads in one call and generates from.

A PEFT adapter or a merged checkpoint cannot carry GainLoRA's gates: each task's branch is weighed by a value
computed from the prompt. A finished GainLoRA run writes `<output_dir>/gated_model/` instead:

    base/                   the pre-trained model as loaded (no branch merged) and its tokenizer: a plain
                            transformers checkpoint
    branches.safetensors    per adapted layer `<name>.lora_A` (n r, d_in) and `<name>.lora_B` (d_out, n r): the n
                            learned tasks' factors stacked in task order, the branch scale folded into B
    gates.safetensors       the n tasks' gate networks and keys (gates.TaskGates' state)
    gated_model.json        what the files mean: model kind, rank, tasks, adapted layers, gate architecture

Load and generate (the prompt formatted as the run trained on it, e.g. the tokenizer's chat template):

    from inflora_dist.gated import load_gated_model
    model, tokenizer = load_gated_model("runs/superni/gated_model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=50)

The model's forward computes the gates from its input's prompt (the whole input of a causal LM's first
generation step; a seq2seq model's encoder input), as the run's own evaluation does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerBase

from inflora_dist import dist
from inflora_dist.export import merged_state_dict, stacked_factors
from inflora_dist.gates import GateRouter, PromptTap, TaskGates
from inflora_dist.inject import InjectionReport, inject_inflora

FORMAT = "inflora-dist gated model"
MANIFEST = "gated_model.json"
_AUTO = {"causal_lm": AutoModelForCausalLM, "seq2seq_lm": AutoModelForSeq2SeqLM}


def save_gated_model(
    folder: Path,
    model: nn.Module,
    report: InjectionReport,
    gates: TaskGates,
    task_names: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    model_kind: str,
) -> None:
    """Write the gated model of the learned tasks `task_names` (the first len(task_names) branches and gates) to
    `folder`. Collective under ZeRO-3 (the base and the B factors are gathered); the main process writes."""
    n = len(task_names)
    state = merged_state_dict(model, report, merge=False)  # collective
    factors = {}
    for name, layer in report.layers.items():
        stacked = stacked_factors(layer)  # collective
        if stacked is not None:
            factors[f"{name}.lora_A"], factors[f"{name}.lora_B"] = stacked
    if not dist.is_main_process():
        return
    if any(len(layer.live_tasks()) != n for layer in report.layers.values()):
        raise ValueError(f"every adapted layer must hold the {n} learned tasks' branches")
    model.save_pretrained(folder / "base", state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder / "base")
    save_file({k: v.contiguous() for k, v in factors.items()}, str(folder / "branches.safetensors"))
    kept = {k: v.detach().cpu().contiguous() for k, v in gates.state_dict().items() if int(k.split(".")[1]) < n}
    save_file(kept, str(folder / "gates.safetensors"))
    first = next(iter(report.layers.values()))
    manifest = {
        "format": FORMAT,
        "version": 1,
        "model_kind": model_kind,
        "tasks": list(task_names),
        "rank": first.rank,
        "layers": list(report.layers),
        "gate": {"architecture": gates.architecture, "hidden": gates.hidden_dim, "dim": gates.dim},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """gated_model.json of a gated model folder; ValueError naming the folder when it is not one."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} is not a gated model folder ({MANIFEST} unreadable: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an inflora-dist gated model manifest")
    return manifest


def load_gated_model(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a gated model folder: the base model with every learned task's branch and the gates
    that weigh them per prompt, in eval mode, ready for `generate`. `dtype`: the base weights' (default: as saved)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    n, rank, gate = len(manifest["tasks"]), manifest["rank"], manifest["gate"]
    auto = _AUTO[manifest["model_kind"]]
    model = auto.from_pretrained(folder / "base", local_files_only=True, **({"dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(folder / "base", local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    report = inject_inflora(model, manifest["layers"], rank, n, fold="stack")  # exact names match exactly
    factors = load_file(str(folder / "branches.safetensors"))
    with torch.no_grad():
        for name, layer in report.layers.items():
            a = factors[f"{name}.lora_A"].reshape(n, rank, layer.in_features)
            b = factors[f"{name}.lora_B"].reshape(layer.out_features, n, rank)
            for t in range(n):
                layer.start_task(t, a[t])
                layer.lora_B(t).copy_(b[:, t])
                layer.finish_task()
    gates = TaskGates(gate["dim"], gate["hidden"], n, gate["architecture"], seed=0)
    gates.load_state_dict(load_file(str(folder / "gates.safetensors")))
    gates.requires_grad_(False)
    reader = model.get_encoder() if manifest["model_kind"] == "seq2seq_lm" else model
    model.gate_router = GateRouter(gates, list(report.layers.values()), PromptTap(reader))
    return model.eval(), tokenizer
