"""``python -m benchmarks [overrides]``: see benchmarks/cli.py and docs/benchmarks.md."""

from benchmarks.cli import main

main()
