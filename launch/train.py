"""Train a continual-learning task sequence with InfLoRA.

    deepspeed launch/train.py --config configs/tiny_vit.yaml [key=value ...]
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny_vit.yaml [key=value ...]
    python launch/train.py --config configs/tiny_vit.yaml [key=value ...]

Overrides are OmegaConf dotlist (train.lr=1e-4 inflora.rank=8). Exits 0 when
the sequence is done, 75 after a pre-emption signal (SIGTERM/SIGUSR1) and 130
after Ctrl-C (SIGINT) were handled with a checkpoint: run again with
resume=auto to continue (docs/training.md lists every exit status).
"""

from __future__ import annotations

import argparse
import signal

from inflora_dist.config import load_run_config
from inflora_dist.engine import exit_process, shutdown_distributed
from inflora_dist.errors import run_command
from inflora_dist.loop import ContinualTrainer
from inflora_dist.trained import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", action="append", default=[], help="run config YAML; repeat to compose files, later ones win"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    configure_logging()
    cfg = load_run_config(args.config, args.overrides)  # validated before any heavy work
    trainer = ContinualTrainer(cfg)
    try:
        return trainer.run()
    finally:
        # A late pre-emption signal (SLURM repeats it) must not kill a run that is finishing anyway.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        shutdown_distributed()


if __name__ == "__main__":
    run_command(main, exit=exit_process)
