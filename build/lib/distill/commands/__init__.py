"""The `distill` command line: `cli.py` dispatches, one module per command."""
