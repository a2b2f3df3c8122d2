"""Sharded checkpoints on object stores: every rank uploads its own object, the coordinator
commits with the storage backend's marker (COMMITTED.json) once every object is whole; a save
that fails or dies before the marker is never listed or loaded. memory:// in one process; the
moto S3 server across 2 spawned ranks."""

from __future__ import annotations

import fsspec
import pytest
import torch
from torch import nn

import torchkeep.distributed as tkd
from _dist_remote import remote_world
from _dist_workers import launch, values
from torchkeep.errors import DistributedCheckpointError, FormatError
from torchkeep.storage.fsspec_backend import FsspecBackend
from torchkeep.storage.urls import backend_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _fs():
    return fsspec.filesystem("memory")


def test_memory_url_save_load_marker_last(tmp_path):
    url = f"memory://{tmp_path.name}/ckpt"
    model = nn.Linear(4, 3)
    tkd.save({"model": model, "epoch": 3}, url, rng=False)
    names = sorted(p.rsplit("/", 1)[1] for p in _fs().ls(url.split("://")[1], detail=False))
    assert names == ["COMMITTED.json", "checkpoint.json", "rank-00000.safetensors"]
    fresh = {"model": nn.Linear(4, 3), "epoch": 0}
    tkd.load(fresh, url, rng=False)
    assert torch.equal(fresh["model"].weight, model.weight) and fresh["epoch"] == 3
    with pytest.raises(DistributedCheckpointError, match="immutable"):
        tkd.save({"model": model}, url, rng=False)


def test_failure_before_the_marker_leaves_nothing_loadable(tmp_path, monkeypatch):
    url = f"memory://{tmp_path.name}/dead"

    def crash(self, target, files):
        raise OSError("connection lost before the commit")

    monkeypatch.setattr(FsspecBackend, "commit_files", crash)
    with pytest.raises(DistributedCheckpointError):
        tkd.save({"model": nn.Linear(2, 2)}, url, rng=False)
    monkeypatch.undo()
    store = backend_for(url)
    try:
        entries = store.list(url)
    except FileNotFoundError:
        entries = []
    assert not store.committed(url, entries)
    with pytest.raises(FormatError, match="no committed"):
        tkd.load({"model": nn.Linear(2, 2)}, url, rng=False)
    tkd.save({"model": nn.Linear(2, 2)}, url, rng=False)  # the unmarked prefix is replaced


def test_two_ranks_on_s3(tmp_path, s3_run):
    (r0, r1) = values(launch(remote_world, 2, str(tmp_path), "s3", s3_run, deadline=180))
    assert r0["equal"] and r1["equal"]
    assert r0["failed"] == [1] and r1["failed"] == [1]
    store = backend_for(f"{s3_run}/bad")
    try:
        entries = store.list(f"{s3_run}/bad")
    except FileNotFoundError:
        entries = []
    assert not store.committed(f"{s3_run}/bad", entries)
    good = store.list(f"{s3_run}/good")
    assert store.committed(f"{s3_run}/good", good)
    assert {e.name for e in good} >= {"rank-00000.safetensors", "rank-00001.safetensors"}
