"""`python -m distill ...` (what `torchrun -m distill` and SLURM scripts call): the CLI."""

import sys

from distill.commands.cli import main

sys.exit(main())
