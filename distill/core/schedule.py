"""Schedules over training steps for an edge's `weight` and its fixed temperatures.

A value in YAML is a plain number (a constant) or a mapping:

    {schedule: constant, value: 0.5}
    {schedule: linear, start: 1.0, end: 0.1, steps: 1000}
    {schedule: cosine, start: 1.0, end: 0.1, steps: 1000}     # half a cosine from start to end
    {schedule: step, values: [1.0, 0.5, 0.1], boundaries: [300, 600]}

Every kind takes an optional `offset: n` (default 0): the schedule sees step - n, so it holds
its first value for n steps (e.g. distil at full weight, then anneal). `linear` and `cosine`
hold `end` after `offset + steps`; `step` takes `values[k]` from `offset + boundaries[k-1]` on.
The step is the run's global optimizer step (Lightning's `global_step`, restored on resume;
each stage of a staged run counts from 0). A linear schedule from 0 is a warmup.

Pure functions (`linear`, `cosine`, `piecewise`) plus `Schedule`, parsed from config with
one-line errors naming the YAML path (`edges.ti_si.weight.schedule: unknown schedule ...`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distill.errors import ConfigError
from distill.losses.base import ArgumentError

KINDS: dict[str, tuple[str, ...]] = {
    "constant": ("value",),
    "linear": ("start", "end", "steps"),
    "cosine": ("start", "end", "steps"),
    "step": ("values", "boundaries"),
}
"""Schedule kind -> its required keys (each also takes `schedule` and an optional `offset`)."""


def linear(step: int, start: float, end: float, steps: int) -> float:
    """From `start` at step 0 to `end` at `steps`, in a straight line; `end` afterwards."""
    p = min(max(step, 0), steps) / steps
    return start + (end - start) * p


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """From `start` at step 0 to `end` at `steps` along half a cosine (SGDR's annealing,
    Loshchilov and Hutter 2017): end + (start - end) (1 + cos(pi t / steps)) / 2."""
    p = min(max(step, 0), steps) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))


def piecewise(step: int, values: Sequence[float], boundaries: Sequence[int]) -> float:
    """`values[k]` where k is the number of boundaries at or below `step` (len(values) =
    len(boundaries) + 1, boundaries increasing)."""
    return values[sum(1 for b in boundaries if step >= b)]


@dataclass(frozen=True)
class Schedule:
    """A value as a function of the training step; `Schedule.parse` builds one from YAML."""

    kind: str
    start: float = 0.0
    end: float = 0.0
    steps: int = 1
    values: tuple[float, ...] = ()
    boundaries: tuple[int, ...] = ()
    offset: int = 0

    def __call__(self, step: int) -> float:
        """The value at training step `step`."""
        s = step - self.offset
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return linear(s, self.start, self.end, self.steps)
        if self.kind == "cosine":
            return cosine(s, self.start, self.end, self.steps)
        return piecewise(s, self.values, self.boundaries)

    def extremes(self) -> tuple[float, float]:
        """(smallest, largest) value the schedule takes (every kind is monotone or a step)."""
        points = self.values if self.kind == "step" else (self.start, self.end)
        return min(points), max(points)

    def describe(self) -> str:
        """A short form for `distill validate`: `cosine(1 -> 0.1, 1000 steps)`."""
        at = f" from step {self.offset}" if self.offset else ""
        if self.kind == "constant":
            return f"{self.start:g}"
        if self.kind == "step":
            shown = ", ".join(f"{v:g}" for v in self.values)
            return f"step([{shown}] at {list(self.boundaries)}{at})"
        return f"{self.kind}({self.start:g} -> {self.end:g}, {self.steps} steps{at})"

    @classmethod
    def parse(cls, value: Any, path: str, *, minimum: float | None = None, why: str = "") -> Schedule:
        """A plain number (a constant) or a schedule mapping, checked.

        Args:
            value: The YAML value.
            path: Its dotted YAML path, e.g. `edges.ti_si.weight`.
            minimum: Values below it are refused (the message adds `why`).

        Raises:
            ConfigError: One line per problem, each starting with `path` or `path.<key>`.
        """
        if _number(value):
            problems = _value_problems(value, path, minimum, why)
            if problems:
                raise ConfigError(problems)
            return cls("constant", start=float(value), end=float(value))
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a number or a schedule mapping ({{schedule: ..., ...}}; kinds: "
                              f"{', '.join(KINDS)}), got {value!r}")
        kind = value.get("schedule")
        if kind is None:
            raise ConfigError(f"{path}.schedule: missing; one of {', '.join(KINDS)}")
        if kind not in KINDS:
            close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}.schedule: unknown schedule {kind!r} ({', '.join(KINDS)}){hint}")
        allowed = ("schedule", *KINDS[kind], "offset")
        problems = []
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(f"{path}.{key}: unknown key; {hint}a {kind} schedule takes {', '.join(allowed[1:])}")
        problems += [f"{path}.{key}: missing; a {kind} schedule takes {', '.join(allowed[1:])}"
                     for key in KINDS[kind] if key not in value]
        offset = value.get("offset", 0)
        if not _integer(offset, 0):
            problems.append(f"{path}.offset: must be an integer >= 0, got {offset!r}")
        for key in ("value", "start", "end"):
            if key in KINDS[kind] and key in value:
                problems += _value_problems(value[key], f"{path}.{key}", minimum, why)
        if "steps" in KINDS[kind] and "steps" in value and not _integer(value["steps"], 1):
            problems.append(f"{path}.steps: must be an integer >= 1, got {value['steps']!r}")
        if kind == "step" and "values" in value and "boundaries" in value:
            problems += _step_problems(value["values"], value["boundaries"], path, minimum, why)
        if problems:
            raise ConfigError(problems)
        if kind == "constant":
            return cls(kind, start=float(value["value"]), end=float(value["value"]), offset=offset)
        if kind == "step":
            return cls(kind, values=tuple(float(v) for v in value["values"]),
                       boundaries=tuple(value["boundaries"]), offset=offset)
        return cls(kind, start=float(value["start"]), end=float(value["end"]), steps=value["steps"], offset=offset)


def is_schedule(value: Any) -> bool:
    """True for a YAML value given as a schedule mapping (a plain number is not one)."""
    return isinstance(value, Mapping)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _integer(x: Any, least: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


def _value_problems(x: Any, path: str, minimum: float | None, why: str) -> list[str]:
    if not _number(x) or not math.isfinite(x):
        return [f"{path}: must be a finite number, got {x!r}"]
    if minimum is not None and x < minimum:
        return [f"{path}: must be >= {minimum:g}{why}, got {x!r}"]
    return []


def _step_problems(values: Any, boundaries: Any, path: str, minimum: float | None, why: str) -> list[str]:
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        return [f"{path}.values: must be a non-empty list of numbers, got {values!r}"]
    if not isinstance(boundaries, Sequence) or isinstance(boundaries, str):
        return [f"{path}.boundaries: must be a list of steps, got {boundaries!r}"]
    problems = [p for i, v in enumerate(values) for p in _value_problems(v, f"{path}.values[{i}]", minimum, why)]
    if not all(_integer(b, 1) for b in boundaries):
        problems.append(f"{path}.boundaries: must be integers >= 1, got {list(boundaries)!r}")
    elif any(b >= c for b, c in zip(boundaries, boundaries[1:])):
        problems.append(f"{path}.boundaries: must increase strictly, got {list(boundaries)!r}")
    if len(values) != len(boundaries) + 1:
        problems.append(f"{path}.values: a step schedule takes one value more than boundaries "
                        f"(the value before the first boundary), got {len(values)} values and "
                        f"{len(boundaries)} boundaries")
    return problems


def weight_schedule(weight: Any, path: str) -> Schedule:
    """An edge's `weight` (a number or a schedule) as a `Schedule`; every value finite and >= 0.

    Raises:
        ConfigError: One line per problem, at `path` (`edges.<edge>.weight`) or below it.
    """
    return Schedule.parse(weight, path, minimum=0.0, why=" (a negative weight maximises the loss)")


def split_scheduled(
    args: Mapping[str, Any], loss_cls: Any, path: str, problems: list[str]
) -> tuple[dict[str, Any], dict[str, Schedule]]:
    """Split a loss's YAML `args` into constructor arguments and scheduled ones.

    A mapping given for an argument the loss lists in `schedulable` is a schedule: the
    constructor gets its value at step 0, and the schedule is returned. A mapping with a
    `schedule` key for any other argument is reported (naming the arguments that can be
    scheduled) and left out; anything else passes through for the signature check.

    Args:
        args: The edge's `args`.
        loss_cls: The loss class, or None when its name is unknown (reported elsewhere).
        path: `edges.<edge>.args`.
        problems: Receives one line per problem.

    Returns:
        (constructor arguments, argument -> schedule).
    """
    schedulable = tuple(getattr(loss_cls, "schedulable", ()) or ())
    plain: dict[str, Any] = {}
    schedules: dict[str, Schedule] = {}
    for name, value in args.items():
        if not is_schedule(value) or (name not in schedulable and "schedule" not in value):
            plain[name] = value
        elif name not in schedulable:
            can = ", ".join(schedulable) if schedulable else "none"
            problems.append(f"{path}.{name}: cannot be scheduled; the arguments of this loss that can: {can}")
        else:
            try:
                schedules[name] = Schedule.parse(value, f"{path}.{name}")
            except ConfigError as e:
                problems.extend(e.problems)
                continue
            plain[name] = schedules[name](0)
    return plain, schedules


def schedule_problems(loss: Any, schedules: Mapping[str, Schedule], path: str) -> list[str]:
    """Problems of scheduled arguments that the loss refuses at some value the schedule takes
    (a temperature reaching 0, a learnable temperature); the loss is left at step 0's values."""
    problems = []
    for name, schedule in schedules.items():
        try:  # the constructor took the step-0 value: a refusal is of scheduling itself
            loss.set_argument(name, schedule(0))
        except ArgumentError as e:
            problems.append(f"{path}.{name}: {e}")
            continue
        for value in schedule.extremes():
            try:
                loss.set_argument(name, value)
            except ArgumentError as e:
                problems.append(f"{path}.{name}: {e} (a value its schedule takes)")
                break
        loss.set_argument(name, schedule(0))
    return problems


__all__ = ["KINDS", "Schedule", "cosine", "linear", "piecewise", "schedule_problems", "split_scheduled",
           "weight_schedule"]
