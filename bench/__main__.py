"""`python -m bench` is the `featbench` command."""

from bench.cli.featbench import cli

if __name__ == "__main__":
    cli()
