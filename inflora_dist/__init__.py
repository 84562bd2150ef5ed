"""inflora-dist: distributed continual learning of large models with InfLoRA."""

from inflora_dist.continual import InfLoRA
from inflora_dist.covariance import CovarianceCollector
from inflora_dist.inject import InjectionReport, count_parameters, inject_inflora
from inflora_dist.layer import InfLoRALinear
from inflora_dist.subspace import SubspaceMemory

__all__ = [
    "CovarianceCollector",
    "InfLoRA",
    "InfLoRALinear",
    "InjectionReport",
    "SubspaceMemory",
    "count_parameters",
    "inject_inflora",
]
__version__ = "0.1.0"
