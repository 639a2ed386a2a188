"""`distill.distributed` answers "which rank am I" from the launcher's environment."""

from __future__ import annotations

import pytest

from distill import distributed


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "3", "LOCAL_RANK": "1"}, 3),  # torchrun
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, 5),  # srun
        ({"LOCAL_RANK": "1"}, 1),  # Lightning's launcher, first node
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, 4),  # a second node's first process
    ],
)
def test_rank_from_the_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rank: int) -> None:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.rank() == rank
    assert distributed.is_rank_zero() is (rank == 0)
    distributed.barrier()  # no process group: returns at once
