"""torchkeep.distributed across spawned ranks (gloo, CPU): DDP, FSDP2 resharding 2->1, 2->4,
1->2, exact resume at world size 2, a rank raising and a rank SIGKILLed during a save.

The phases run in order and share one directory: phase A (2 ranks) writes the checkpoints the
later phases load at other world sizes. Each rank's assertions run inside the rank; the tests
check what every rank reported.
"""

from __future__ import annotations

import os

import pytest

from _dist_scenarios import phase_a, phase_b, phase_c, phase_d
from _dist_workers import launch, values

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def phase_a_out(root) -> dict:
    rank0, rank1 = launch(phase_a, 2, root, "a")
    assert rank1 is None, f"rank 1 should have died (SIGKILL) in the last save: {rank1}"
    return values([rank0])[0]


def _spread(writers: dict, world: int) -> None:
    """Each replicated tensor written once (one chunk), and by more than one rank in all."""
    assert writers, "no tensors recorded"
    assert set(writers.values()) <= set(range(world))
    assert len(set(writers.values())) > 1, f"rank 0 wrote everything: {writers}"


def test_ddp_world2_written_once_spread_over_ranks(phase_a_out):
    _spread(phase_a_out["ddp"]["writers"], 2)


def test_rank_raising_makes_every_rank_raise_naming_it(root, phase_a_out):
    raised = phase_a_out["raise"]  # rank 0's view; rank 1 raised the injected error itself
    assert raised["failures"] == [1]
    assert "rank 1" in raised["message"] and "injected disk failure" in raised["message"]
    assert not os.path.exists(os.path.join(root, "raised"))


def test_rank_killed_mid_save_no_commit_no_hang(root, phase_a_out):
    killed = phase_a_out["killed"]
    assert killed["seconds"] < 60, killed
    assert (
        "Nothing was committed" in killed["message"] or "nothing was committed" in killed["message"]
    )
    assert not os.path.exists(os.path.join(root, "killed"))
    assert os.path.exists(os.path.join(root, "warmup", "checkpoint.json"))


def test_fsdp_2_to_1_then_1_to_2(root, phase_a_out):
    (b,) = values(launch(phase_b, 1, root, "b"))
    assert b["skipped"] == ["RankStateSkipped"]  # loader + RNG state not restored at 2 -> 1
    d = values(launch(phase_d, 2, root, "d"))
    assert all(r["skipped"] == ["RankStateSkipped"] for r in d)  # B was saved by one rank
    # exact resume at world size 2: same losses after the restart as in the run that went on
    first = phase_a_out["resume"]
    assert d[0]["resume"] == first and len(first) == 2
    # numbered steps: both ranks see the same steps after retention and restore the latest
    assert [r["steps"] for r in d] == [
        {"steps": [2, 3], "latest": 3, "restored": 3, "value": 3}
    ] * 2
    # async save: control came back before the background write and commit finished
    assert all(r["async"]["blocked"] < r["async"]["total"] for r in d)


def test_fsdp_2_to_4_ddp_world4_coordinator_killed(root, phase_a_out):
    results = launch(phase_c, 4, root, "c")
    assert results[0] is None, "rank 0 should have died (SIGKILL) just before its commit"
    c = values(results[1:])
    assert all(r["skipped"] == ["RankStateSkipped"] for r in c)
    _spread(c[0]["ddp"]["writers"], 4)
    # the coordinator died before the rename: every other rank raised, nothing was committed
    assert all(r["coordinator_killed"]["seconds"] < 60 for r in c)
    assert not os.path.exists(os.path.join(root, "coordinator-killed"))
