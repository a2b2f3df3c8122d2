"""Remote storage (issue 19) against a real S3-compatible server (moto on 127.0.0.1) over
HTTP with s3fs, and memory:// for the rest of the fsspec contract. No mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import torchkeep
from torchkeep import CheckpointManager, knobs
from torchkeep.cli.main import cli
from torchkeep.errors import (
    BucketNotFoundError,
    StorageAuthError,
    StorageError,
    StorageUnavailableError,
    TorchkeepError,
)
from torchkeep.storage import urls
from torchkeep.storage.fsspec_backend import MARKER
from torchkeep.storage.retry import translate
from torchkeep.storage.run_dir import list_leftovers, list_steps

pytest.importorskip("s3fs")
HERE = os.path.dirname(os.path.abspath(__file__))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))


def _obj() -> dict:
    gen = torch.Generator().manual_seed(1)
    return {
        "big": torch.randn(2, 3_000_000, generator=gen),  # 24 MB: several multipart parts
        "small": torch.arange(10),
        "half": torch.randn(100, dtype=torch.float16, generator=gen),
        "note": "hello",
    }


@pytest.fixture
def few_retries(monkeypatch):
    """One retry per layer (botocore via storage_options, s3fs's loop, torchkeep's), so that
    tests of failures that outlast the retries take seconds."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setattr(knobs, "REMOTE_RETRIES", 1)
    monkeypatch.setattr(knobs, "REMOTE_BACKOFF_MS", 1)


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(knobs, "REMOTE_PART_BYTES", 5 * 1024 * 1024)
    monkeypatch.setattr(knobs, "REMOTE_BUFFER_BYTES", 16 * 1024 * 1024)


def test_save_load_roundtrip_s3(s3_run, s3_server, small_parts):
    obj = _obj()
    url = f"{s3_run}/x.tk"
    opts = s3_server.options()
    torchkeep.save(obj, url, storage_options=opts)
    back = torchkeep.load(url, storage_options=opts)
    assert back["note"] == "hello"
    for key in ("big", "small", "half"):
        assert torch.equal(back[key], obj[key])
    assert torchkeep.verify(url) == []
    with torchkeep.open_file(url) as reader:
        assert torch.equal(reader.read_entry(reader.keys()[0]).flatten()[:5].clone(),
                           reader.read_entry(reader.keys()[0]).flatten()[:5])  # fmt: skip
    # the file opens with stock safetensors once downloaded: same bytes as a local save
    import s3fs
    from safetensors.torch import load as st_load

    data = s3fs.S3FileSystem(**opts).cat_file(url)
    assert torch.equal(st_load(data)["small"], obj["small"])


def test_load_state_dict_and_async(s3_run, small_parts):
    model = _model()
    url = f"{s3_run}/model.tk"
    handle = torchkeep.save_async(model.state_dict(), url)
    handle.wait()
    other = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))
    report = torchkeep.load_state_dict(other, url)
    assert not report.missing and not report.unexpected
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_single_file_save_never_partial(s3_server, small_parts, few_retries):
    from s3server import FaultProxy

    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/x.tk"
    torchkeep.save({"v": torch.zeros(10)}, url)
    proxy = FaultProxy(s3_server.endpoint)
    opts = s3_server.options(proxy.endpoint, attempts=1)
    proxy.fail(500, 1000, method="PUT")  # every part upload fails
    with pytest.raises(StorageUnavailableError, match=bucket):
        torchkeep.save(_obj(), url, storage_options=opts)
    proxy.clear()
    assert torch.equal(torchkeep.load(url)["v"], torch.zeros(10))  # the old object, whole
    proxy.fail(503, 2, method="PUT")  # throttled twice: retried, then it goes through
    torchkeep.save(_obj(), url, storage_options=opts)
    assert torch.equal(torchkeep.load(url)["small"], torch.arange(10))
    proxy.stop()


def test_manager_on_s3(s3_run, small_parts):
    run = f"{s3_run}/run"
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    with CheckpointManager(run, keep_last=2, rng=False) as mgr:
        for step in range(4):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            mgr.save(step, {"model": model, "opt": opt}, metrics={"loss": 1.0 / (step + 1)})
        assert [s.step for s in mgr.steps()] == [2, 3]
    expected = model[0].weight.detach().clone()
    fresh = _model()
    with CheckpointManager(run, rng=False) as mgr:
        assert mgr.restore({"model": fresh, "opt": torch.optim.Adam(fresh.parameters())}) == 3
    assert torch.equal(fresh[0].weight, expected)
    assert torchkeep.load(run)["objects"]["model"]["0.weight"].equal(expected)


def test_marker_is_the_commit(s3_run):
    run = f"{s3_run}/run"
    backend = urls.backend_for(run)
    with CheckpointManager(run, rng=False) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
        mgr.save(2, {"w": torch.ones(4) * 2})
    # an upload that died before its marker: objects under the prefix, no marker
    backend.write_bytes(f"{run}/step-0000000003/state.tk", b"partial")
    # a delete that died after removing the marker
    backend.fs.rm_file(backend.key(f"{run}/step-0000000002/{MARKER}"))
    assert [s.step for s in list_steps(run, backend)] == [1]
    assert sorted(list_leftovers(run, backend)) == [
        f"{run}/step-0000000002",
        f"{run}/step-0000000003",
    ]
    result = CliRunner().invoke(cli, ["ls", run, "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert [r["step"] for r in listing["steps"]] == [1] and len(listing["leftovers"]) == 2
    state = {"w": torch.zeros(4)}
    with CheckpointManager(run, rng=False) as mgr:  # opening sweeps the leftovers
        assert list_leftovers(run, backend) == []
        assert mgr.restore(state) == 1
    assert torch.equal(state["w"], torch.ones(4))


def test_cli_on_s3(s3_run):
    url = f"{s3_run}/x.tk"
    torchkeep.save({"a": torch.arange(6.0)}, url)
    for args in (["inspect", url, "--json"], ["verify", url, "--json"], ["scan", url, "--json"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    run = f"{s3_run}/run"
    with CheckpointManager(run, rng=False) as mgr:
        for step in range(3):
            mgr.save(step, {"w": torch.ones(3) * step})
    result = CliRunner().invoke(cli, ["prune", run, "--keep-last", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["deleted"] == [0, 1]
    result = CliRunner().invoke(cli, ["inspect", run, "--json"])
    assert result.exit_code == 0, result.output
    converted = f"{s3_run}/converted.safetensors"
    result = CliRunner().invoke(cli, ["convert", url, converted])
    assert result.exit_code == 0, result.output
    assert torch.equal(torchkeep.load(converted)["a"], torch.arange(6.0))
    result = CliRunner().invoke(cli, ["diff", url, converted])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["ls", "s3://no-such-bucket-tk/run"])
    assert result.exit_code != 0 and "bucket does not exist" in result.output


def test_errors_are_storage_errors(s3_server, few_retries):
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-tk"):
        torchkeep.save({"a": torch.zeros(1)}, "s3://no-such-bucket-tk/x.tk")
    opts = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}  # nothing listens there
    opts["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 1}
    with pytest.raises(StorageUnavailableError, match="127.0.0.1|s3://"):
        torchkeep.save({"a": torch.zeros(1)}, "s3://b/x.tk", storage_options=opts)
    err = translate(PermissionError("ExpiredToken: the token has expired"), "s3://b/x", "upload")
    assert isinstance(err, StorageAuthError) and "s3://b/x" in str(err)
    assert issubclass(StorageUnavailableError, StorageError)
    for name in ("RemoteStorageError", "StorageUnavailableError", "StorageAuthError"):
        assert name in torchkeep.__all__ and issubclass(getattr(torchkeep, name), StorageError)
    assert torchkeep.BucketNotFoundError is BucketNotFoundError


def test_missing_object_is_not_found(s3_run):
    with pytest.raises(torchkeep.CheckpointNotFoundError, match="nope.tk"):
        torchkeep.load(f"{s3_run}/nope.tk")
    with pytest.raises(torchkeep.CheckpointNotFoundError, match="nope.tk"):
        torchkeep.open_file(f"{s3_run}/nope.tk")


def test_url_without_fsspec(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.setattr(urls, "_CACHE", {})
    with pytest.raises(TorchkeepError, match=r"pip install torchkeep\[remote\]"):
        torchkeep.save({"a": torch.zeros(1)}, "s3://bucket/x.tk")


def test_import_does_not_import_fsspec():
    code = "import sys, torchkeep; print('fsspec' in sys.modules, 's3fs' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_memory_filesystem_contract():
    run = "memory://tk-contract/run"
    with CheckpointManager(run, keep_last=1, rng=False) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
        mgr.save(2, {"w": torch.ones(3) * 2})
        assert [s.step for s in mgr.steps()] == [2]
    torchkeep.save({"w": torch.arange(5)}, "memory://tk-contract/f.tk")
    assert torch.equal(torchkeep.load("memory://tk-contract/f.tk")["w"], torch.arange(5))


def test_two_tiers(tmp_path, s3_run):
    local = str(tmp_path / "run")
    remote = f"{s3_run}/run"
    with CheckpointManager(
        local, keep_last=1, rng=False, replicate_to=remote, replica_policy={"keep_last": 2}
    ) as mgr:
        for step in range(4):
            mgr.save(step, {"w": torch.ones(3) * step})
        mgr.wait_replication()
        assert [s.step for s in mgr.steps()] == [3]
        assert [s.step for s in mgr.replica_steps()] == [2, 3]
    # the local copy of the newest step is corrupt: the remote copy of that step is used
    state_file = os.path.join(local, "step-0000000003", "state.tk")
    with open(state_file, "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\xff\xff\xff\xff")
    state = {"w": torch.zeros(3)}
    with CheckpointManager(local, rng=False, replicate_to=remote) as mgr:
        assert mgr.restore(state) == 3
    assert torch.equal(state["w"], torch.ones(3) * 3)
    # the local tier is lost: restore comes from the remote one
    import shutil

    shutil.rmtree(local)
    state = {"w": torch.zeros(3)}
    with CheckpointManager(local, rng=False, replicate_to=remote) as mgr:
        assert mgr.restore(state) == 3
    assert torch.equal(state["w"], torch.ones(3) * 3)


def _child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "remote_child.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _trials(long_run: bool) -> int:
    return 12 if long_run else 2


@pytest.mark.slow
def test_kill_during_upload(s3_server, s3_run, long_run):
    from remote_child import state

    run = f"{s3_run}/run"
    first = _child("manager", run, "0")
    assert first.wait(120) == 0, first.stderr.read()
    rng = __import__("random").Random(7)
    step = 1
    torn = 0
    for _ in range(_trials(long_run)):
        child = _child("manager", run, str(step))
        assert child.stdout.readline().strip() == "saving", child.stderr.read()
        time.sleep(rng.uniform(0.0, 1.5))  # a 24 MB upload takes ~1-2 s on moto
        child.kill()
        child.wait()
        s3_server.quiesce()  # the server finishes what the dead writer had already sent
        steps = [s.step for s in list_steps(run, urls.backend_for(run))]
        assert steps[0] == 0 and set(steps) <= set(range(step + 1))
        torn += bool(list_leftovers(run, urls.backend_for(run)))  # killed mid-upload
        newest = steps[-1]
        loaded = {"w": torch.zeros(6, 1024, 1024), "step": -1}
        with CheckpointManager(run, rng=False) as mgr:
            assert mgr.restore(loaded) == newest
            assert list_leftovers(run, urls.backend_for(run)) == []
        assert torch.equal(loaded["w"], state(newest)["w"])
        step += 1
    done = _child("manager", run, str(step))  # the next save succeeds
    assert done.wait(120) == 0, done.stderr.read()
    if long_run:  # the kills did land inside uploads (a prefix without its marker was left)
        assert torn >= 1


@pytest.mark.slow
def test_kill_during_replication_resumes(tmp_path, s3_server, s3_run):
    local = str(tmp_path / "run")
    remote = f"{s3_run}/run"
    child = _child("replicate", local, remote, "3")
    line = child.stdout.readline()  # every step committed locally
    assert line.strip() == "saved", child.stderr.read()
    time.sleep(0.5)
    child.kill()
    child.wait()
    s3_server.quiesce()
    assert [s.step for s in list_steps(local)] == [0, 1, 2]  # nothing committed locally lost
    with CheckpointManager(local, rng=False, replicate_to=remote) as mgr:
        mgr.wait_replication()  # the new manager resumed the upload
        assert [s.step for s in mgr.replica_steps()] == [0, 1, 2]


def _proxied(s3_server):
    from s3server import FaultProxy

    proxy = FaultProxy(s3_server.endpoint)
    return proxy, s3_server.options(proxy.endpoint, attempts=1)


def _restores(run: str, opts: dict, step: int, value: torch.Tensor) -> None:
    state = {"w": torch.zeros_like(value)}
    with CheckpointManager(run, rng=False, storage_options=opts) as mgr:
        assert [s.step for s in mgr.steps()][-1] == step
        assert mgr.restore(state) == step
    assert torch.equal(state["w"], value)


def test_server_gone_mid_upload(s3_server, small_parts, few_retries):
    """The server stops answering in the middle of a step's upload (connections dropped)."""
    proxy, opts = _proxied(s3_server)
    run = f"s3://{s3_server.new_bucket()}/run"
    first = torch.randn(3_000_000)
    with CheckpointManager(run, rng=False, storage_options=opts) as mgr:
        mgr.save(0, {"w": first})
        proxy.drop(10_000, after=4)  # a few parts go through, then nothing does
        with pytest.raises(StorageUnavailableError, match=run):
            mgr.save(1, {"w": torch.randn(3_000_000)})
        proxy.clear()
    _restores(run, opts, 0, first)  # no partial step committed; the old one bit-identical
    with CheckpointManager(run, rng=False, storage_options=opts) as mgr:
        mgr.save(1, {"w": first * 2})  # the next save succeeds
    _restores(run, opts, 1, first * 2)
    proxy.stop()


def test_marker_write_fails(s3_server, few_retries):
    """Every data object is uploaded but the commit marker is refused: no step appears."""
    proxy, opts = _proxied(s3_server)
    run = f"s3://{s3_server.new_bucket()}/run"
    with CheckpointManager(run, rng=False, storage_options=opts) as mgr:
        mgr.save(0, {"w": torch.ones(5)})
        proxy.fail(503, 10_000, path=MARKER)
        with pytest.raises(StorageUnavailableError):
            mgr.save(1, {"w": torch.ones(5) * 2})
        proxy.clear()
        assert [s.step for s in mgr.steps()] == [0]
    _restores(run, opts, 0, torch.ones(5))
    proxy.stop()


def test_expired_credentials(s3_server, few_retries):
    """The store answers 403 ExpiredToken: a StorageAuthError naming the URL, nothing saved."""
    proxy, opts = _proxied(s3_server)
    url = f"s3://{s3_server.new_bucket()}/x.tk"
    proxy.fail(403, 10_000, code="ExpiredToken")
    with pytest.raises(StorageAuthError, match=url):
        torchkeep.save({"a": torch.zeros(3)}, url, storage_options=opts)
    with pytest.raises(StorageAuthError, match="credentials"):
        CheckpointManager(f"{url}-run", storage_options=opts)
    proxy.clear()
    assert not urls.backend_for(url).fs.exists(url)
    proxy.stop()
