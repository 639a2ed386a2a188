"""Teacher ensembles: how every in-batch loss with a teacher target reads N >= 1 teachers.

A loss that distils a teacher target subclasses `TeacherEnsemble`: its YAML `inputs` list
the student pair, then one pair per teacher (then any trailing slot, like `fused_kl`'s
`pair`); `teacher_weights` w_k (normalised to sum to 1; default equal) weighs the teachers,
and the loss's teacher temperature or scale takes one value per teacher (a number: the same
for every teacher, which is what a schedule sets). The ensemble target is built in the
loss's own target space, where the teachers' outputs are comparable:

- a softmax target (`similarity_kl`, `fused_kl`): P_i = sum_k w_k softmax(L^k_i), the
  probabilities averaged, not the logits, as MobileCLIP averages its CLIP teachers (Vasu et
  al., CVPR 2024, arXiv 2311.17049); a temperature per teacher is MobileCLIP2's per-teacher
  logit scale (Faghri et al. 2025). `softmax_ensemble` returns log P, logits whose softmax is P;
- Bernoulli pair probabilities (`sigmoid_kd`): p_ij = sum_k w_k sigmoid(z^k_ij), each
  teacher with its own scale and bias; `sigmoid_ensemble` returns logit(p);
- similarity values (`similarity_mse`): T = sum_k w_k S^k; `mean_ensemble`.

With one teacher each of them returns that teacher's own tensor, so a one-teacher edge
computes exactly what it computed before ensembles existed, bit for bit. All of them act
element- or row-wise, so local-loss mode (`EdgeContext.rows`) and exact accumulation apply
unchanged: each rank builds the ensemble target of its own rows only.

What reads no ensemble: the task losses `infonce`, `triplet`, `siglip` and `hard_negative`
compare two embeddings with targets from the image ids; a teacher node in them (ConaCLIP's
SI-TT edge) is an anchor space, not a target distribution, and teachers of different widths
share no space to average anchors in. For several teachers there, list one edge per teacher,
each with its own `weight` (their weighted sum is the loss against every teacher's anchors);
to distil the teachers' joint view of the same pair, use `similarity_kl` on the student pair
with one pair per teacher. `fused_feature` distils features, not scores, and keeps one teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import PAIR_SAME, PAIR_SLOTS, ArgumentError, EdgeLoss

PerTeacher = float | list[float]
"""A per-teacher argument as a loss stores it: one number for every teacher, or a list."""


def teacher_slots(n: int) -> tuple[str, ...]:
    """`teacher1_a, teacher1_b, ..., teacher<n>_a, teacher<n>_b`."""
    return tuple(f"teacher{k}_{side}" for k in range(1, n + 1) for side in "ab")


def check_each(value: float | Sequence[float], name: str, check: Callable[[float, str], None]) -> PerTeacher:
    """Check a per-teacher argument: a number, or each value of a list (reported at `name[i]`).

    Returns:
        The number as a float, or a list of floats (a copy).
    """
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check(v, f"{name}[{i}]")
        return [float(v) for v in value]
    check(value, name)
    return float(value)


def _check_weight(value: float, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ArgumentError(name, f"{name} must be a finite number >= 0, got {value}")


def _teachers(n: int) -> str:
    return f"{n} teacher pair" + ("" if n == 1 else "s")


class TeacherEnsemble(EdgeLoss):
    """An in-batch loss whose teacher target is read from N >= 1 teacher pairs.

    Inputs: the student pair (`inputs[:2]`), then one pair per teacher, then `trailing`. One
    teacher's pair keeps the names it always had (`teacher_a, teacher_b`); N teachers are
    `teacher1_a, teacher1_b, ..., teacher<N>_b`, each pair of one width within itself only
    (a 256-wide and a 384-wide teacher can teach one 128-wide student).

    A subclass sets the attributes of its `per_teacher` arguments in `__init__` (checked with
    `check_each`), then calls `init_teachers(teacher_weights)`; `bind` (the number of teacher
    pairs the edge lists) checks every list given against it. `forward` takes
    `(student_a, student_b, *teachers, ctx=...)`, pairs them with `teacher_pairs`, reads each
    per-teacher argument with `each` and combines the teachers with `self.weights` through
    `softmax_ensemble`, `sigmoid_ensemble` or `mean_ensemble`.

    Class attributes:
        per_teacher: Constructor arguments that take one value per teacher, each mapped to
            the attribute `forward` reads it from: a number (the same for every teacher; a
            schedule sets a number) or a list.
        min_teachers: The fewest teacher pairs an edge may list.
        teacher_sides: The suffixes of a teacher pair's two slots.
        trailing: Slots after the teacher pairs (`fused_kl`'s pair scorer).
    """

    inputs = PAIR_SLOTS
    same_dim = PAIR_SAME
    per_teacher: ClassVar[Mapping[str, str]] = {}
    min_teachers: ClassVar[int] = 1
    teacher_sides: ClassVar[tuple[str, str]] = ("a", "b")
    trailing: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def teacher_names(cls, n: int) -> tuple[str, ...]:
        """The slots of `n` teacher pairs: `teacher_a, teacher_b` for one, numbered for several."""
        if n == 1:
            return tuple(f"teacher_{side}" for side in cls.teacher_sides)
        return tuple(f"teacher{k}_{side}" for k in range(1, n + 1) for side in cls.teacher_sides)

    @classmethod
    def slots(cls, n: int) -> tuple[str, ...] | None:
        teachers, odd = divmod(n - 2 - len(cls.trailing), 2)
        if odd or teachers < cls.min_teachers:
            return None
        return (*cls.inputs[:2], *cls.teacher_names(teachers), *cls.trailing)

    @classmethod
    def takes(cls) -> str:
        first = cls.slots(2 + 2 * cls.min_teachers + len(cls.trailing))
        assert first is not None
        then = f", then {', '.join(cls.trailing)}" if cls.trailing else ""
        if cls.min_teachers > 1:
            return f"the student pair then {cls.min_teachers} or more teacher pairs{then} ({', '.join(first)}, ...)"
        a, b = cls.teacher_names(2)[:2]
        return (f"the student pair then 1 or more teacher pairs{then} ({', '.join(first)}; "
                f"N teachers: {a}, {b}, ..., teacher<N>_{cls.teacher_sides[1]})")

    def _lists(self) -> dict[str, list[float]]:
        """The per-teacher arguments given as lists (argument name -> values), weights last."""
        lists = {name: getattr(self, attr) for name, attr in self.per_teacher.items()
                 if isinstance(getattr(self, attr), list)}
        if self.given_weights is not None:
            lists["teacher_weights"] = self.given_weights
        return lists

    def init_teachers(self, teacher_weights: Sequence[float] | None) -> None:
        """Check `teacher_weights` and the lengths of the lists given against each other, and
        take the number of teachers from them (`min_teachers` when no list is given) until
        `bind` gives the edge's.

        Raises:
            ArgumentError: A negative or non-finite weight, all weights 0, a list shorter than
                `min_teachers`, or two lists of different lengths.
        """
        if teacher_weights is not None:
            for i, w in enumerate(teacher_weights):
                _check_weight(w, f"teacher_weights[{i}]")
            if sum(teacher_weights) <= 0:
                raise ArgumentError("teacher_weights", f"teacher_weights must not all be 0, got {list(teacher_weights)}")
        self.given_weights = None if teacher_weights is None else [float(w) for w in teacher_weights]
        first: tuple[str, int] | None = None
        for name, values in self._lists().items():
            if len(values) < self.min_teachers:
                if self.min_teachers > 1:
                    raise ArgumentError(name, f"{name} takes one value per teacher and an ensemble has at least "
                                              f"{self.min_teachers} teachers (for one, use similarity_kl), got {len(values)}")
                raise ArgumentError(name, f"{name} takes one value per teacher, got an empty list")
            if first is None:
                first = (name, len(values))
            elif len(values) != first[1]:
                raise ArgumentError(name, f"{name} takes one value per teacher: got {len(values)} for {first[1]} {first[0]}")
        self._set_teachers(first[1] if first else self.min_teachers)

    def _set_teachers(self, n: int) -> None:
        self.n_teachers = n
        weights = self.given_weights or [1.0] * n
        self.weights = [w / sum(weights) for w in weights]
        slots = self.slots(2 + 2 * n + len(self.trailing))
        assert slots is not None
        self.inputs = slots  # type: ignore[misc]  # this edge's slots
        names = self.teacher_names(n)
        self.same_dim = (slots[:2], *zip(names[0::2], names[1::2]))  # type: ignore[misc]

    def bind(self, slots: tuple[str, ...]) -> None:
        """Take the number of teachers from the edge's inputs; each list given must hold one
        value per teacher pair listed."""
        n = (len(slots) - 2 - len(self.trailing)) // 2
        for name, values in self._lists().items():
            if len(values) != n:
                raise ArgumentError(name, f"{name} takes one value per teacher: the inputs list {_teachers(n)}, "
                                          f"got {len(values)} values")
        self._set_teachers(n)

    def each(self, value: PerTeacher) -> list[float]:
        """A per-teacher attribute as one value per teacher."""
        return list(value) if isinstance(value, list) else [value] * self.n_teachers

    def teacher_pairs(self, teachers: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """The teacher inputs of `forward` as (a, b) pairs, one per teacher.

        Raises:
            ValueError: If they are not two per teacher.
        """
        if len(teachers) != 2 * self.n_teachers:
            names = self.teacher_names(self.n_teachers)
            raise ValueError(f"this edge has {_teachers(self.n_teachers)} ({', '.join(names)}), "
                             f"got {len(teachers)} teacher inputs")
        return list(zip(teachers[0::2], teachers[1::2]))


def _log_weights(weights: Sequence[float], like: Tensor) -> Tensor:
    """(K, 1, ..., 1) log w_k, broadcasting against K stacked tensors like `like` (-inf for w = 0)."""
    w = torch.tensor(list(weights), dtype=torch.float32, device=like.device)
    return w.log().reshape(-1, *([1] * like.dim()))


def softmax_ensemble(logits: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """log sum_k w_k softmax(logits_k) over the last dimension: logits of the teachers'
    averaged distribution (softmax of the result is that average; normalised `weights`).
    Computed in log space (a logsumexp over the teachers), so a probability too small for
    float32 keeps its log. One teacher: its logits, unchanged."""
    if len(logits) == 1:
        return logits[0]
    log_probs = torch.stack([F.log_softmax(x.float(), dim=-1) for x in logits])
    return torch.logsumexp(log_probs + _log_weights(weights, logits[0]), dim=0)


def sigmoid_ensemble(logits: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """logit(sum_k w_k sigmoid(logits_k)), element-wise: the logit of the teachers' averaged
    Bernoulli probability (normalised `weights`), as log p - log(1 - p) with both logs from a
    logsumexp of log-sigmoids, so that p near 0 or 1 stays exact. One teacher: its logits."""
    if len(logits) == 1:
        return logits[0]
    z = torch.stack([x.float() for x in logits])
    log_w = _log_weights(weights, logits[0])
    return torch.logsumexp(log_w + F.logsigmoid(z), dim=0) - torch.logsumexp(log_w + F.logsigmoid(-z), dim=0)


def mean_ensemble(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k w_k values_k (normalised `weights`). One teacher: its values, unchanged."""
    if len(values) == 1:
        return values[0]
    return sum(w * v for w, v in zip(weights, values))  # type: ignore[return-value]


def mixture(logits: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k w_k softmax(logits_k) over the last dimension: the ensemble's target distribution
    as probabilities (`softmax_ensemble` gives its logits)."""
    return sum(w * x.float().softmax(-1) for w, x in zip(weights, logits))  # type: ignore[return-value]


def kl_to_mixture(probs: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(probs || softmax(student_logits)) for a target distribution `probs`."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (torch.xlogy(probs, probs) - probs * log_q).sum(-1).mean()


__all__ = [
    "PerTeacher",
    "TeacherEnsemble",
    "check_each",
    "kl_to_mixture",
    "mean_ensemble",
    "mixture",
    "sigmoid_ensemble",
    "softmax_ensemble",
    "teacher_slots",
]
