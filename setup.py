"""The package list: `distill` and its subpackages, plus the repository's `experiments/`
folder installed as `distill.experiments` (the YAMLs `distill demo` runs). Everything else
is in setup.cfg (package data is here: setup() arguments replace setup.cfg's)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["distill", "distill.*"]), "distill.experiments"],
    package_dir={"distill.experiments": "experiments"},
    package_data={
        "distill": ["py.typed", "assets/*", "assets/**/*"],
        "distill.experiments": ["*.yaml", "*.md", "ablations/*.yaml", "cluster/*"],
    },
)
