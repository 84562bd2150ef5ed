"""Dispatch `python -m inflora_dist.bench COMMAND ...` to the command's module."""

from __future__ import annotations

import argparse
import importlib

from inflora_dist.errors import run_command

#: Command name -> module providing SUMMARY, add_arguments(parser) and run(args) -> dict.
COMMANDS: dict[str, str] = {
    "step": "inflora_dist.bench.step",
    "cl": "inflora_dist.bench.cl",
    "scale": "inflora_dist.bench.scale",
    "large": "inflora_dist.bench.large",
    "budget": "inflora_dist.bench.budget",
    "gpu": "inflora_dist.bench.gpu",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inflora_dist.bench", description="InfLoRA benchmarks, each against a plain baseline."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name,
            help=module.SUMMARY,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen command; returns its figures."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    run_command(main)
