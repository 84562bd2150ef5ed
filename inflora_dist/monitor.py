"""Monitoring: W&B on rank 0 only (imported lazily), nothing on other ranks; each rank's host and GPU memory.

`WANDB_MODE=offline` (or `wandb.mode: offline`, the default) needs no network;
the run directory lands under `<output_dir>/wandb`. A resumed run passes its
saved run id so it continues the same W&B run.
"""

from __future__ import annotations

import logging
import os
import resource
from pathlib import Path
from typing import Any

import torch

from inflora_dist import dist
from inflora_dist.config import WandbConfig

logger = logging.getLogger(__name__)


def memory_mb_per_rank() -> tuple[list[float], list[float]]:
    """(resident MB now, peak resident MB so far) of every rank's process, by rank. Collective (one all-gather).

    Host memory (Linux /proc and getrusage): what a CPU run holds; on GPUs see
    torch.cuda.max_memory_allocated.
    """
    try:
        resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        resident = 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    table = dist.all_gather(torch.tensor([resident, peak], dtype=torch.float64, device=dist.collective_device()))
    return table[:, 0].tolist(), table[:, 1].tolist()


def device_peak_mb_per_rank(device: torch.device) -> list[float] | None:
    """Peak device memory allocated so far (torch.cuda.max_memory_allocated, MiB) of every rank, by rank, when
    the run is on GPUs; None on the host. Collective on GPUs (one all-gather): every rank runs on the same kind."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**20], dtype=torch.float64)
    return dist.all_gather(peak.to(dist.collective_device()))[:, 0].tolist()


class Monitor:
    """Logs scalars, tables and images to W&B from rank 0; a no-op elsewhere or when disabled."""

    def __init__(self, cfg: WandbConfig, output_dir: Path, run_config: dict[str, Any], run_id: str | None) -> None:
        self.run: Any = None
        if not (cfg.enabled and cfg.mode != "disabled" and dist.is_main_process()):
            return
        import wandb  # lazy: only rank 0 of a run that asked for it pays the import

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            mode=cfg.mode,
            dir=str(output_dir),
            id=run_id,
            resume="allow" if run_id else None,
            config=run_config,
        )
        logger.info("W&B run %s (%s mode) in %s", self.run.id, cfg.mode, self.run.dir)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (saved in checkpoints), if logging."""
        return self.run.id if self.run is not None else None

    def log(self, values: dict[str, Any], step: int) -> None:
        """Scalars at a global step."""
        if self.run is not None:
            self.run.log(values, step=step)

    def log_matrix(self, rows: list[list[float]], task_names: list[str], image: Path | None, step: int) -> None:
        """The accuracy matrix as a table (and its heatmap image)."""
        if self.run is None:
            return
        columns = ["after_task", *task_names]
        data = [[task_names[i], *row, *[None] * (len(task_names) - len(row))] for i, row in enumerate(rows)]
        values: dict[str, Any] = {"accuracy_matrix": self._wandb.Table(columns=columns, data=data)}
        if image is not None and image.exists():
            values["accuracy_heatmap"] = self._wandb.Image(str(image))
        self.run.log(values, step=step)

    def finish(self) -> None:
        """Close the run (flushes the offline files)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
