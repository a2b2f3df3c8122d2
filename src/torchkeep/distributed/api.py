"""``torchkeep.distributed.save`` / ``load``: a training state across a process group.

Every rank calls the same function with its own objects. Sharding, deduplication of replicated
tensors and resharding are DCP's (``dcp.save``/``dcp.load`` with torchkeep's storage and
planners); torchkeep adds the files, checksums, JSON metadata, the commit, per-rank state, a
bounded wait for the other ranks, and one error type that names the failed rank.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .. import knobs
from ..errors import (
    CorruptionError,
    DistributedCheckpointError,
    FormatError,
    StateDictMismatchError,
    TorchkeepError,
    UnsupportedValueError,
)
from ..transfer.asyncsave import SaveHandle
from . import background, training
from . import metadata as meta
from .planners import TorchkeepLoadPlanner, TorchkeepSavePlanner
from .reader import TorchkeepReader
from .writer import TorchkeepWriter

T = TypeVar("T")
_GROUPS: dict[tuple[int, float], Any] = {}


class RankStateSkipped(UserWarning):
    """The world size changed since the save: per-rank RNG and loader states were not restored."""


def checkpoint_group(timeout: float | None = None) -> Any:
    """A gloo group over every rank for checkpoint collectives, made once per timeout.

    Its own group gives the collectives a finite timeout (a dead rank makes the others raise
    instead of waiting for ever) and runs them on CPU whatever the training backend.
    None when no process group is initialized (a single process).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    seconds = float(knobs.DIST_TIMEOUT_S if timeout is None else timeout)
    token = (id(dist.group.WORLD), seconds)
    if token not in _GROUPS:
        _GROUPS[token] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
    return _GROUPS[token]


def save(
    state: MutableMapping[str, Any],
    path: str | os.PathLike,
    *,
    rng: bool = True,
    timeout: float | None = None,
    async_save: bool = False,
    storage_options: dict | None = None,
    before_commit: Callable[[str], None] | None = None,
    after_commit: Callable[[], None] | None = None,
) -> SaveHandle | None:
    """Save a training state from every rank of the process group into the directory ``path``.

    Each rank writes its own file (its shards, its share of the replicated tensors, its RNG and
    data-loader state); the step is committed by one rename once every file is durable. On any
    rank's failure every rank raises :class:`DistributedCheckpointError` and nothing is
    committed. ``path`` must not exist. ``path`` may be an fsspec URL (``storage_options``
    configure it): every rank uploads its object, the coordinator commits with the marker.

    ``async_save=True``: the caller blocks only while this rank's state is copied; the write
    and the commit run in the background. Returns a handle (``wait()`` raises the save's error);
    the next save or load waits for it.

    ``before_commit(tmp_dir)`` (coordinator) adds files to the step before its rename;
    ``after_commit()`` runs on every rank after the commit, in the save's thread (the manager's
    retention). Both are for :class:`torchkeep.CheckpointManager`.
    """
    background.wait_in_flight()
    path = meta.target_path(path)
    parts = training.split(state)
    own_state = training.rank_state(parts, rng)
    dcp_state = training.dcp_state(parts)
    group = checkpoint_group(timeout)  # a collective: made here, in every rank's main thread

    def job(dcp_part: dict, own_part: dict) -> None:
        _save(dcp_part, own_part, path, group, before_commit, storage_options)
        if after_commit is not None:
            after_commit()

    if not async_save:
        job(dcp_state, own_state)
        return None
    frozen, frozen_own = background.snapshot((dcp_state, own_state))
    return background.start(lambda: job(frozen, frozen_own), f"save {path}")


def _save(
    dcp_state: dict,
    own_state: dict,
    path: str,
    group: Any,
    before_commit: Callable[[str], None] | None = None,
    storage_options: dict | None = None,
) -> None:
    writer = TorchkeepWriter(
        path, rank_state=own_state, before_commit=before_commit, storage_options=storage_options
    )
    try:
        _collective(
            "save",
            path,
            lambda: dcp.save(
                dcp_state,
                storage_writer=writer,
                planner=TorchkeepSavePlanner(),
                process_group=group,
            ),
        )
    except BaseException:
        writer.discard_temp()  # coordinator: the uncommitted directory goes now, not at a sweep
        raise


def load(
    state: MutableMapping[str, Any],
    path: str | os.PathLike,
    *,
    rng: bool = True,
    timeout: float | None = None,
    storage_options: dict | None = None,
) -> MutableMapping[str, Any]:
    """Restore what :func:`save` wrote into ``state`` in place, at any world size.

    Sharded and replicated tensors are resharded to the current layout. RNG and data-loader
    states are restored to the same rank when the world size is unchanged; otherwise they are
    skipped with a :class:`RankStateSkipped` warning (they cannot be split or merged).
    """
    background.wait_in_flight()
    path = meta.target_path(path)
    parsed = meta.read(path, storage_options)  # hostile or missing: FormatError here
    parts = training.split(state)
    target = training.dcp_state(parts)
    group = checkpoint_group(timeout)
    reader = TorchkeepReader(path, storage_options)
    _collective(
        "load",
        path,
        lambda: dcp.load(
            target, storage_reader=reader, planner=TorchkeepLoadPlanner(), process_group=group
        ),
    )
    training.apply(parts, target, state, path)
    _restore_rank_state(parts, parsed, reader, rng, path)
    return state


def _restore_rank_state(
    parts: training.Parts, parsed: meta.Parsed, reader: TorchkeepReader, rng: bool, path: str
) -> None:
    rank, world = _rank_world()
    if not (rng or parts.loaders):
        return
    if world != parsed.world_size or rank not in parsed.rank_state:
        warnings.warn(
            f"{path}: saved by {parsed.world_size} ranks, restored by {world}: per-rank RNG "
            "and data-loader states cannot be split or merged, so they were NOT restored "
            "(resume is not bit-exact); model, optimizer and other state were resharded",
            RankStateSkipped,
            stacklevel=3,
        )
        return
    shard = reader.open_shard(rank)
    try:
        saved = shard.decode(shard.rank_state_node, "rank state")
    finally:
        shard.close()
    if saved is None:
        raise StateDictMismatchError(f"{path}: rank {rank} saved no rank state")
    training.restore_rank_state(parts, saved, rng, f"{path}: rank {rank}")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective(action: str, path: str, run: Callable[[], T]) -> T:
    """Run a DCP call; turn its per-rank failures into one error that names the ranks."""
    try:
        return run()
    except CheckpointException as exc:
        failures = {
            int(r): f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            for r, (e, _tb) in exc.failures.items()
        }
        listed = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        outcome = "nothing was committed" if action == "save" else "the state may be partly loaded"
        same = _same_kind(exc)
        if same is not None:  # e.g. a hostile file: every rank raises the FormatError itself
            raise same(
                f"{action} of {path!r} failed on rank(s) {sorted(failures)}: {listed}"
            ) from (_first(exc))
        raise DistributedCheckpointError(
            f"{action} of {path!r} failed on rank(s) {sorted(failures)} ({listed}); {outcome}",
            failures,
        ) from _first(exc)
    except RuntimeError as exc:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistributedCheckpointError(
            f"{action} of {path!r} failed: a collective with the other ranks broke ({first}); "
            "a rank probably died or timed out. Nothing was committed; restart the job and "
            "restore the last committed step."
        ) from exc


#: Errors about the files themselves keep their type when re-raised on every rank.
_FILE_ERRORS = (FormatError, CorruptionError, StateDictMismatchError, UnsupportedValueError)


def _same_kind(exc: CheckpointException) -> type[TorchkeepError] | None:
    kinds = {type(e) for e, _tb in exc.failures.values()}
    if len(kinds) == 1:
        (kind,) = kinds
        if issubclass(kind, _FILE_ERRORS):
            return kind
    return None


def _first(exc: CheckpointException) -> BaseException:
    return next(iter(exc.failures.values()))[0] if exc.failures else exc
