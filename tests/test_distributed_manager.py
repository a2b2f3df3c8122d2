"""CheckpointManager and save_checkpoint/load_checkpoint inside a process group (2 spawned gloo
ranks): sharded steps, retention, agreement on the latest step, fallback, async, exact resume;
and the run directory they leave, as single-process tools see it."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from _dist_managed import managed
from _dist_workers import launch, values
from torchkeep.cli.main import cli
from torchkeep.storage.run_dir import list_steps

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> tuple[str, list[dict]]:
    root = str(tmp_path_factory.mktemp("managed"))
    return root, values(launch(managed, 2, root, "m"))


def test_every_rank_agrees_and_retention_applies(world2):
    root, ranks = world2
    for r in ranks:
        # keep_last=2 -> 10, 11; keep_best by loss -> 2; keep_every=10 -> 10
        assert r["steps"] == [2, 10, 11] and r["latest"] == 11
        assert r["exists"] == "TorchkeepError"  # refused on every rank, not only the coordinator


def test_exact_resume_through_the_manager(world2):
    for r in world2[1]:
        assert r["resume"] == {"restored": 11, "step": 11, "same_losses": True}


def test_fallback_walks_back_on_every_rank(world2):
    for r in world2[1]:
        assert r["fallback"] == {
            "strict": "CorruptionError",
            "used": 10,
            "warned": True,
            "note": True,
        }


def test_async_manager_per_rank(world2):
    for r in world2[1]:
        a = r["async"]
        assert a["steps"] == [2] and a["restored"] == 2
        assert a["blocked"] <= a["total"]


def test_save_and_load_checkpoint_detect_the_group(world2):
    for r in world2[1]:
        assert r["functions"]["step"] == 42
        assert r["functions"]["files"] == [
            "checkpoint.json",
            "rank-00000.safetensors",
            "rank-00001.safetensors",
        ]


def test_single_process_step_restores_in_a_group(world2):
    for r in world2[1]:
        assert r["single_step"] == {"used": 5, "epoch": 9, "same": True}


def test_sharded_steps_are_run_directory_steps(world2):
    """ls and prune (single process, no group) see sharded steps with their metrics."""
    run = os.path.join(world2[0], "run")
    infos = list_steps(run)
    assert [s.step for s in infos] == [2, 10, 11]
    assert [s.metrics["loss"] for s in infos] == [1.0, 3.0, 2.0]
    assert infos[0].policy["keep_best"] == 1
    with open(os.path.join(run, "step-0000000010", "meta.json")) as f:
        meta = json.load(f)
    assert {f["name"] for f in meta["files"]} == {
        "checkpoint.json",
        "rank-00000.safetensors",
        "rank-00001.safetensors",
    }
    step11 = os.path.join(run, "step-0000000011")  # rank 1's file was damaged by _fallback
    shown = CliRunner().invoke(cli, ["inspect", step11, "--json"])
    shards = json.loads(shown.output)["shards"]
    assert [(s["rank"], s["status"]) for s in shards] == [(0, "ok"), (1, "corrupt")]
    assert all(s["chunks"] > 0 and s["tensor_bytes"] > 0 for s in shards)  # FSDP: both wrote
    assert "rank-00001.safetensors" in shards[1]["problems"][0]
    assert [s["rank_state"] for s in shards] == [True, True]
    text = CliRunner().invoke(cli, ["inspect", step11])
    assert "shards" in text.output and "corrupt" in text.output
    out = CliRunner().invoke(cli, ["ls", run, "--json"])
    assert out.exit_code == 0, out.output
    assert "11" in out.output
    pruned = CliRunner().invoke(cli, ["prune", run, "--keep-last", "1", "--json"])
    assert pruned.exit_code == 0, pruned.output
    assert [s.step for s in list_steps(run)] == [11]
