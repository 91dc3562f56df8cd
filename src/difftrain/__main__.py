"""Run the CLI as `python -m difftrain ...`."""

from difftrain.cli import run

run()
