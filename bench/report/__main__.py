"""`python -m bench.report DIR`: the same as `featbench-report DIR`."""

from bench.report import cli

cli()
