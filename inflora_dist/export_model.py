"""Write the merged model of an existing run: what `export.merged_model: true` writes at the end of training.

    python -m inflora_dist.export_model --run runs/demo [--out DIR] [--max-shard-size 5GB]
    torchrun --nproc_per_node 8 -m inflora_dist.export_model --run-dir runs/llm   # a ZeRO-3 run, gathered

`<run>/model/` (or `--out`) becomes a plain transformers checkpoint with every
learned branch merged into the weights (W + sum_t B_t A_t, in the base dtype,
sharded safetensors), with the tokenizer for an LLM, and `heads.safetensors` +
`classes.json` for a vision run. The model is the run's after its newest
finished task (trained.py).

A GainLoRA run is refused (its gates weigh each branch per prompt; no merged
weights can): its finished run holds `gated_model/` (inflora_dist/gated.py).

`--out` must be absent, an empty folder or an earlier export (its
`inflora_export.json` lists what it wrote): anything else, a file, the run
directory, a folder holding a run or other files, is refused before anything
is read or written (export.check_export_target), so an export never deletes
what is not its own.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from inflora_dist import dist
from inflora_dist.engine import exit_process, shutdown_distributed
from inflora_dist.errors import run_command
from inflora_dist.export import check_export_target, written_atomically
from inflora_dist.methods import METHODS
from inflora_dist.run_record import recorded_config
from inflora_dist.trained import TrainedRun, add_run_arguments, configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inflora_dist.export_model", description=__doc__.split("\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--out", default=None, help="directory to write (default: <run>/model)")
    parser.add_argument("--max-shard-size", default=None, help="safetensors shard size (default: the run's export)")
    args = parser.parse_args(argv)
    configure_logging()
    out = Path(args.out or Path(args.run) / "model")
    check_export_target(out)  # before the model is built: minutes saved, nothing written
    method = recorded_config(args.run)[0].method
    if not METHODS[method].adapter_export:
        raise ValueError(
            f"{args.run} is a method={method} run: a merged model cannot carry its input-dependent gates; its "
            f"export is {Path(args.run) / 'gated_model'} (inflora_dist.gated.load_gated_model loads it)"
        )
    trained = TrainedRun(args.run, args.checkpoint)
    shard = args.max_shard_size or trained.cfg.export.max_shard_size
    with written_atomically(out) as folder:  # collective; an earlier export at `out` is replaced whole
        trained.workload.export_model(trained.report, folder, shard)  # collective under ZeRO-3
    if dist.is_main_process():
        print(f"wrote {out} ({', '.join(trained.learned)} merged)", flush=True)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    run_command(main, exit=exit_process)
