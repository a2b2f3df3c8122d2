"""CheckpointManager's RNG capture and restore, fast (the resume tests cover it only slowly).

Each test draws from every global generator (Python ``random``, NumPy's legacy global
generator, torch's CPU generator) after a save, scrambles them, restores through the manager
and requires the very same draws again, including the cached second Gaussian of ``random.gauss``
and NumPy's ``has_gauss`` state, which a restore that rebuilt only the main state would miss.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import torchkeep


@pytest.fixture(autouse=True)
def _keep_global_generators():
    """These tests reseed the global generators; put them back for the tests that follow."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def _seed_and_advance(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.random()
    random.gauss(0.0, 1.0)  # leaves the second Gaussian of the pair cached
    np.random.standard_normal()  # leaves NumPy's cached Gaussian (has_gauss=1)
    torch.rand(3)


def _draws() -> tuple:
    """The next values of every generator (the Gaussians consume the cached halves first)."""
    return (
        random.gauss(0.0, 1.0),
        random.random(),
        float(np.random.standard_normal()),
        np.random.randint(0, 2**31, size=4).tolist(),
        torch.rand(5).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
    )


def _scramble() -> None:
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)


def _state() -> dict:
    return {"w": torch.zeros(3)}


@pytest.mark.parametrize("async_save", [False, True])
def test_restore_puts_every_generator_back(tmp_path, async_save: bool) -> None:
    _seed_and_advance(7)
    with torchkeep.CheckpointManager(tmp_path, async_save=async_save) as mgr:
        mgr.save(1, _state())
        expected = _draws()
        _scramble()
        assert _draws() != expected  # the scramble really moved every generator
        assert mgr.restore(_state()) == 1
        assert _draws() == expected


def test_each_step_restores_its_own_generator_state(tmp_path) -> None:
    _seed_and_advance(1)
    expected = {}
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        for step in (1, 2):
            mgr.save(step, _state())
            expected[step] = _draws()  # also moves the generators on before the next save
    assert expected[1] != expected[2]
    _scramble()
    reader = torchkeep.CheckpointManager(tmp_path)  # a fresh manager, as after a restart
    assert reader.restore(_state(), step=1) == 1
    assert _draws() == expected[1]
    assert reader.restore(_state()) == 2
    assert _draws() == expected[2]
    reader.close()


def test_rng_false_neither_saves_nor_touches_generators(tmp_path) -> None:
    _seed_and_advance(3)
    with torchkeep.CheckpointManager(tmp_path, rng=False) as mgr:
        mgr.save(1, _state())
        _scramble()
        _seed_and_advance(5)
        expected = (random.getstate(), torch.get_rng_state())
        assert mgr.restore(_state()) == 1
        assert random.getstate() == expected[0]
        assert torch.equal(torch.get_rng_state(), expected[1])
    # A manager that wants RNG state restores a step saved without it with a warning, and
    # leaves the generators as they are.
    before = _draws_state()
    with (
        torchkeep.CheckpointManager(tmp_path) as mgr,
        pytest.warns(UserWarning, match="no RNG state"),
    ):
        assert mgr.restore(_state()) == 1
    assert _draws_state() == before


def _draws_state() -> tuple:
    return (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist())
