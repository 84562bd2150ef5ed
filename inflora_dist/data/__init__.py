"""Task sequences as webdataset shards on any fsspec store: spec, builder, planner, reader."""

from inflora_dist.data.reader import ShardError, TaskLoader, TaskStream, open_task
from inflora_dist.data.spec import SplitSpec, TaskSequenceConfig, TaskSpec, load_task_sequence

__all__ = [
    "ShardError",
    "SplitSpec",
    "TaskLoader",
    "TaskSequenceConfig",
    "TaskSpec",
    "TaskStream",
    "load_task_sequence",
    "open_task",
]
