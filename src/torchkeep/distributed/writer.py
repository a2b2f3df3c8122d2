"""DCP ``StorageWriter`` that writes torchkeep shard files and commits the step atomically.

Call order (DCP drives it): every rank ``set_up_storage_writer`` and ``prepare_local_plan``; the
coordinator ``prepare_global_plan`` creates the temporary step directory and tells every rank
where it is; every rank ``write_data`` writes one file, ``rank-NNNNN.safetensors``, with
everything DCP planned for it (tensor chunks as safetensors entries with xxh3 checksums,
non-tensor values in the typed tree, never ``torch.save`` bytes) and fsyncs it; DCP gathers the
results to the coordinator only after every rank returned, so when ``finish`` runs every file is
durable. ``finish`` writes ``checkpoint.json`` and renames the directory into place: the commit.
A rank that dies or fails before that leaves only a temporary directory, which readers ignore.
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..errors import StorageError
from ..storage.backend import BytesPayload
from ..storage.io import ops, write_all
from ..storage.local import (
    atomic_file,
    commit_dir,
    describe_os_error,
    make_temp_dir,
    sweep_temps,
)
from ..storage.urls import backend_for, is_url, remote_backend_for
from ..transfer.writer import PreparedPayload, prepare, write_prepared
from . import metadata as meta
from .metadata import Stored

#: Top-level keys of a shard file's typed tree: tensor chunks, non-tensor values, rank state.
TENSORS, VALUES, RANK_STATE = "t", "v", "x"


@dataclass(frozen=True)
class _Target:
    """What the coordinator scatters to each rank: the temporary directory and the rank."""

    tmp_dir: str
    rank: int


def chunk_name(index: MetadataIndex, whole: bool) -> str:
    """Key of a chunk in the typed tree: the fqn, plus ``@offsets`` for a shard of a tensor."""
    if whole or index.offset is None:
        return index.fqn
    return f"{index.fqn}@{','.join(str(o) for o in index.offset)}"


class TorchkeepWriter(StorageWriter):
    """Write a DCP checkpoint as torchkeep files under ``path`` (a directory made at commit).

    ``path`` must not exist yet: committed checkpoints are immutable. ``rank_state`` (set by
    :func:`torchkeep.distributed.save`) is this rank's own state (RNG, data loader), stored in
    its file and restored to the same rank. ``before_commit(tmp_dir)`` runs on the coordinator
    after ``checkpoint.json`` is durable and before the rename (the manager's ``meta.json``).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        rank_state: Any = None,
        before_commit: Callable[[str], None] | None = None,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.storage_options = storage_options
        self.path = meta.target_path(path) if path is not None else None
        self.rank_state = rank_state
        self.before_commit = before_commit  # coordinator: adds files (meta.json) to the step
        self.is_coordinator = False
        self.rank = 0
        self.world_size = 1
        self.tmp_dir: str | None = None

    @property
    def checkpoint_id(self) -> str | None:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = meta.target_path(checkpoint_id)
        self.tmp_dir = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.path is None:
            raise StorageError("TorchkeepWriter needs a path (or dcp.save(checkpoint_id=...))")
        self.is_coordinator = is_coordinator
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.rank = int(kwargs.get("rank", self.rank))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: refuse an existing target, create the temporary step directory."""
        assert self.path is not None
        if is_url(self.path):
            self.tmp_dir = self._stage_remote(self.path)
        else:
            self.tmp_dir = self._stage_local(self.path)
        self.world_size = len(plans)
        return [
            dataclasses.replace(p, storage_data=_Target(self.tmp_dir, rank))
            for rank, p in enumerate(plans)
        ]

    def _stage_remote(self, url: str) -> str:
        """Object store: objects go under the final prefix; the commit marker makes them a
        checkpoint. A committed prefix is refused; an unmarked one (a dead save) is removed."""
        store = remote_backend_for(url, self.storage_options)
        try:
            entries = store.list(url)
        except FileNotFoundError:
            entries = []
        if entries and store.committed(url, entries):
            raise StorageError(
                f"{url!r} already exists; torchkeep checkpoints are immutable. Save to a new "
                "path (one per step) or delete the old one first."
            )
        if entries:
            store.remove(url)
        return store.stage(url)

    def _stage_local(self, path: str) -> str:
        if os.path.lexists(path):
            raise StorageError(
                f"{path!r} already exists; torchkeep checkpoints are immutable. Save to a "
                "new path (one per step) or delete the old one first."
            )
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise describe_os_error(exc, "creating the parent directory of", path) from exc
        sweep_temps(parent)  # leftovers of saves whose coordinator died (same host only)
        return make_temp_dir(path)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's file durably; returns a completed future of its write results."""
        target = plan.storage_data
        if not isinstance(target, _Target):
            raise StorageError("TorchkeepWriter.write_data: the plan was not prepared by it")
        self.tmp_dir, self.rank = target.tmp_dir, target.rank
        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        results: list[WriteResult] = []
        for item in plan.items:
            stored, nbytes = self._collect(item, planner, tensors, values)
            results.append(WriteResult(index=item.index, size_in_bytes=nbytes, storage_data=stored))
        tree = {TENSORS: tensors, VALUES: values, RANK_STATE: self.rank_state}
        prepared = prepare(tree)
        if is_url(target.tmp_dir):  # an object appears whole when its upload completes
            name = posixpath.join(target.tmp_dir, meta.rank_file(target.rank))
            backend_for(name, self.storage_options).write_payload(name, PreparedPayload(prepared))
        else:
            name = os.path.join(target.tmp_dir, meta.rank_file(target.rank))
            with atomic_file(name, prepared.total_bytes) as fd:
                write_prepared(prepared, fd, ops())
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _collect(
        self, item: WriteItem, planner: SavePlanner, tensors: dict, values: dict
    ) -> tuple[Stored, int]:
        if item.type == WriteItemType.BYTE_IO:
            value = resolve_value(item, planner)
            values[item.index.fqn] = value
            return Stored(self.rank, item.index.fqn), 0
        data = planner.resolve_data(item)
        assert isinstance(data, torch.Tensor)
        whole = item.type == WriteItemType.TENSOR
        name = chunk_name(item.index, whole)
        tensors[name] = data.detach()
        return Stored(self.rank, name), data.numel() * data.element_size()

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator, after every rank's file is durable: write the metadata, commit."""
        assert self.path is not None and self.tmp_dir is not None
        stored = {r.index: r.storage_data for rank_results in results for r in rank_results}
        rank_state = list(range(len(results))) if self.rank_state is not None else []
        body = meta.encode(metadata, stored, len(results), rank_state)
        if is_url(self.tmp_dir):
            self._commit_remote(self.tmp_dir, body, len(results))
            self.tmp_dir = None
            return
        with atomic_file(os.path.join(self.tmp_dir, meta.METADATA_FILE), len(body)) as fd:
            write_all(ops(), fd, memoryview(body), 0)
        if self.before_commit is not None:
            self.before_commit(self.tmp_dir)
        commit_dir(self.tmp_dir, self.path)
        self.tmp_dir = None

    def _commit_remote(self, url: str, body: bytes, world: int) -> None:
        """Write ``checkpoint.json``, then the commit marker listing every rank's object with
        the size the store reports (the marker is written last: it is the commit)."""
        store = remote_backend_for(url, self.storage_options)
        store.write_payload(posixpath.join(url, meta.METADATA_FILE), BytesPayload(body))
        sizes = {e.name: e.size for e in store.list(url) if e.kind == "file"}
        names = [meta.rank_file(r) for r in range(world)] + [meta.METADATA_FILE]
        missing = [n for n in names if n not in sizes]
        if missing:
            raise StorageError(f"{url}: objects missing before the commit: {missing}")
        store.commit_files(url, [{"name": n, "size": sizes[n]} for n in names])

    def discard_temp(self) -> None:
        """Coordinator, after a failed save: remove the uncommitted temporary directory."""
        tmp, self.tmp_dir = self.tmp_dir, None
        if self.is_coordinator and tmp is not None and is_url(tmp):
            backend_for(tmp, self.storage_options).abandon(tmp)
            return
        if self.is_coordinator and tmp is not None and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)

    def storage_meta(self) -> None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def resolve_value(item: WriteItem, planner: SavePlanner) -> Any:
    """The live non-tensor object behind a BYTE_IO item, never its ``torch.save`` bytes.

    DCP's default planner (and its subclasses) exposes ``lookup_object``; any other planner's
    ``resolve_data`` bytes were pickled in this very process a moment ago and are read back with
    the weights-only unpickler, then stored in the typed tree.
    """
    lookup = getattr(planner, "lookup_object", None)
    if lookup is not None:
        return lookup(item.index)
    data = planner.resolve_data(item)
    if isinstance(data, io.BytesIO):
        data.seek(0)
        return torch.load(data, weights_only=True)
    return data
