"""The trainer values `distill validate` accepts are the ones Lightning accepts (the check
cannot import Lightning itself: it runs in commands that must not load it)."""

from __future__ import annotations

import typing

from lightning_fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from pytorch_lightning.accelerators import AcceleratorRegistry
from pytorch_lightning.strategies import StrategyRegistry

from distill.core.check import ACCELERATORS, STRATEGIES, TRAINER_PRECISIONS, known_strategy


def test_precisions_match_lightning() -> None:
    lightning = set(typing.get_args(_PRECISION_INPUT_STR)) | set(typing.get_args(_PRECISION_INPUT_STR_ALIAS))
    assert set(TRAINER_PRECISIONS) == lightning


def test_accelerators_and_strategies_are_lightnings() -> None:
    assert set(ACCELERATORS) - {"auto", "gpu"} <= set(AcceleratorRegistry.available_accelerators())
    available = set(StrategyRegistry.available_strategies()) | {"auto"}
    assert {s for s in STRATEGIES if s != "xla"} <= available
    missing = [s for s in available if not known_strategy(s) and "tpu" not in s and "xla" not in s]
    assert not missing, f"Lightning strategies distill would refuse: {missing}"
