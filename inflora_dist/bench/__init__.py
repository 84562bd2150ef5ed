"""Benchmarks of InfLoRA's own overheads: `python -m inflora_dist.bench COMMAND [--help]`.

Each command lives in its own module of this package, which provides `SUMMARY`
(one line for the command list), `add_arguments(parser)` and `run(args) -> dict`;
`__main__` lists them in `COMMANDS`.
"""
