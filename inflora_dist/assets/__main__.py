"""`python -m inflora_dist.assets`: the converters' CLI (inflora_dist/assets/cli.py)."""

from inflora_dist.assets.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
