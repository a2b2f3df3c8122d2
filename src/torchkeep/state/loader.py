"""Exact resume of ``torchdata``'s ``StatefulDataLoader``, including its next epoch.

``StatefulDataLoader.load_state_dict`` restores the position inside the epoch lazily, when the
next iterator is created, and that creation draws from the loader's (and the sampler's)
generator before the saved sampler state is put back. With ``num_workers=0`` the generator then
ends in a different state than in the run that saved, so the *following* epoch is shuffled
differently. torchkeep therefore also saves the generators' states at save time and, on
restore, creates the resumed iterator immediately and then puts the generators back exactly
where the saving process had them. The next ``iter(loader)`` returns that iterator.
"""

from __future__ import annotations

from typing import Any

import torch


def is_stateful_loader(obj: Any) -> bool:
    """True for ``torchdata.stateful_dataloader.StatefulDataLoader`` (and subclasses)."""
    return any(
        cls.__name__ == "StatefulDataLoader" and cls.__module__.startswith("torchdata")
        for cls in type(obj).__mro__
    )


def _generators(loader: Any) -> dict[str, torch.Generator]:
    found: dict[str, torch.Generator] = {}
    for name, owner in (("loader", loader), ("sampler", getattr(loader, "sampler", None))):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found.values()):
            found[name] = gen
    return found


def capture_generators(loader: Any) -> dict[str, torch.Tensor]:
    """The states of the loader's and its sampler's generators, right now."""
    return {name: gen.get_state() for name, gen in _generators(loader).items()}


def settle(loader: Any, saved: dict[str, Any]) -> None:
    """After ``load_state_dict``: build the resumed iterator now, then restore the generators."""
    pending = getattr(loader, "next_iter_state", None)
    if isinstance(pending, dict) and pending.get("_iterator_finished") is True:
        loader.next_iter_state = None  # the saved epoch was over: the next iter starts a new one
        loader._iterator = None
    elif pending:
        iter(loader)  # consumes next_iter_state (this draws from the generators)
        loader._initial_iter_for_state_dict = True  # the next iter(loader) returns this iterator
    for name, gen in _generators(loader).items():
        state = saved.get(name)
        if isinstance(state, torch.Tensor):
            gen.set_state(state.to("cpu", torch.uint8))
