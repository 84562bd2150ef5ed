"""Typed configs: OmegaConf structured dataclasses merged with YAML and dotlist overrides.

Errors name the offending key: an unknown key lists the valid ones, a value of
the wrong type says which field rejected it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

import fsspec
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

T = TypeVar("T")


def read_yaml(url: str, storage_options: Mapping[str, Any] | None = None) -> DictConfig:
    """A YAML file from any fsspec URL; FileNotFoundError names the path."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"config file {url} does not exist")
    with fs.open(path, "r") as f:
        return OmegaConf.create(f.read())


def merge_structured(schema: type[T], *sources: Mapping | DictConfig, overrides: Sequence[str] = ()) -> T:
    """Merge `sources` (then dotlist `overrides`) onto the dataclass `schema` and return an instance."""
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(schema),
            *[OmegaConf.create(dict(s)) if not isinstance(s, DictConfig) else s for s in sources],
        )
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep:
                raise ValueError(f"override {override!r} is not KEY=VALUE")
            # update() walks list indices too (tasks.0.train.samples=7); the value is parsed as YAML.
            OmegaConf.update(merged, key, yaml.safe_load(value), merge=True)
    except (ConfigKeyError, ConfigAttributeError) as err:
        owner = err.object_type
        valid = sorted(f.name for f in fields(owner)) if is_dataclass(owner) else []
        raise ValueError(
            f"unknown key {err.key!r} in {getattr(owner, '__name__', schema.__name__)} (at {err.full_key!r}); "
            f"valid keys: {valid}"
        ) from None
    except ValidationError as err:
        raise ValueError(f"bad value for {err.full_key!r}: {err.msg.splitlines()[0]}") from None
    result: Any = OmegaConf.to_object(merged)
    return result
