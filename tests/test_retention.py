"""Retention policies as tables, and prune on a real run directory."""

from __future__ import annotations

import os

import pytest

from torchkeep.errors import TorchkeepError
from torchkeep.retention import keep_best, keep_every, keep_last, kept_reasons, prune
from torchkeep.storage.run_dir import StepInfo, list_leftovers, list_steps, step_dirname


def _steps(losses: dict[int, float | None]) -> list[StepInfo]:
    return [
        StepInfo(s, f"/r/{s}", float(s), 1, {} if v is None else {"loss": v})
        for s, v in losses.items()
    ]


STEPS = _steps({10: 0.9, 20: 0.5, 30: 0.7, 40: 0.2, 50: 0.6, 60: 0.8})


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({}, {s: ["all"] for s in (10, 20, 30, 40, 50, 60)}),
        ({"keep_last": 2}, {50: ["last"], 60: ["last"]}),
        ({"keep_last": 10}, {s: ["last"] for s in (10, 20, 30, 40, 50, 60)}),
        ({"keep_best": 1, "monitor": "loss"}, {40: ["best"], 60: ["last"]}),
        ({"keep_best": 2, "monitor": "loss", "mode": "max"}, {10: ["best"], 60: ["last", "best"]}),
        ({"monitor": "loss"}, {40: ["best"], 60: ["last"]}),
        ({"keep_every": 20}, {20: ["every"], 40: ["every"], 60: ["last", "every"]}),
        (
            {"keep_last": 1, "keep_best": 1, "monitor": "loss", "keep_every": 30},
            {30: ["every"], 40: ["best"], 60: ["last", "every"]},
        ),
        ({"keep_best": 1, "monitor": "missing"}, {60: ["last"]}),
    ],
)
def test_kept_reasons_table(policy: dict, expected: dict) -> None:
    assert kept_reasons(STEPS, **policy) == expected


def test_newest_always_kept_and_empty_list() -> None:
    assert kept_reasons([], keep_last=1) == {}
    reasons = kept_reasons(STEPS, keep_every=7)
    assert reasons == {60: ["last"]}


def test_pure_policies() -> None:
    assert keep_last(STEPS, 3) == {40, 50, 60}
    assert keep_best(STEPS, 2, "loss", "min") == {40, 20}
    assert keep_every(STEPS, 25) == {50}
    ties = _steps({1: 0.5, 2: 0.5, 3: float("nan"), 4: None})
    assert keep_best(ties, 1, "loss") == {2}  # ties favour the newer; NaN/missing never best


@pytest.mark.parametrize(
    "policy",
    [{"keep_last": 0}, {"keep_best": 1}, {"mode": "median"}, {"keep_every": 1.5}],
)
def test_invalid_policy_says_what_to_do(policy: dict) -> None:
    with pytest.raises(TorchkeepError, match="keep_|mode"):
        kept_reasons(STEPS, **policy)


def _make_step(root: str, step: int, loss: float) -> None:
    path = os.path.join(root, step_dirname(step))
    os.makedirs(path)
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write(f'{{"step": {step}, "time": {step}.0, "metrics": {{"loss": {loss}}}}}')
    with open(os.path.join(path, "state.tk"), "wb") as f:
        f.write(b"x" * step)


def test_prune_directory_dry_run_and_delete(tmp_path) -> None:
    root = str(tmp_path)
    for step, loss in ((1, 0.3), (2, 0.1), (3, 0.4), (4, 0.5)):
        _make_step(root, step, loss)
    assert prune(root, keep_last=1, monitor="loss", dry_run=True) == [1, 3]
    assert [s.step for s in list_steps(root)] == [1, 2, 3, 4]
    assert prune(root, keep_last=1, monitor="loss") == [1, 3]
    steps = list_steps(root)
    assert [s.step for s in steps] == [2, 4]
    assert steps[0].metrics == {"loss": 0.1} and steps[0].size > 2
    assert list_leftovers(root) == []
