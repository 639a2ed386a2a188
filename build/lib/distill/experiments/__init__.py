"""The experiment YAMLs, installed with the package as `distill.experiments` (setup.py maps
this folder), so `distill demo` finds them after a plain `pip install`."""
