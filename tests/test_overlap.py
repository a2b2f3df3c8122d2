"""Overlapped snapshots and incremental steps (issue 23): guard, waits, references, retention."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from torch import nn

import torchkeep
from torchkeep import CheckpointManager
from torchkeep.cli.main import cli
from torchkeep.errors import FormatError, SnapshotRaceError, UnsafePathError
from torchkeep.storage.references import REFS_KEY, TensorRef, encode_refs
from torchkeep.transfer import overlap
from torchkeep.transfer.asyncsave import write_file
from torchkeep.transfer.reader import FileReader
from torchkeep.transfer.writer import PreparedFile, prepare


def _model(frozen: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))
    if frozen:
        model[0].requires_grad_(False)
    return model


def _train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 32)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)


@pytest.fixture(autouse=True)
def _no_hook():
    yield
    overlap.set_copy_hook(None)


def _clone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------ overlapped snapshots
def test_guard_catches_in_place_write_during_copy(tmp_path) -> None:
    model = _model(frozen=False)
    opt = _opt(model)
    _train(model, opt)
    mgr = CheckpointManager(tmp_path, snapshot="overlap")
    weight = model[2].weight

    def poke(key: str) -> None:  # runs in the copy thread, before the first deferred copy
        overlap.set_copy_hook(None)
        with torch.no_grad():
            weight.add_(1.0)  # an in-place write the optimizer pre-hook cannot have stopped

    overlap.set_copy_hook(poke)
    mgr.save(1, {"model": model, "opt": opt})
    with pytest.raises(SnapshotRaceError, match="changed in place"):
        mgr.wait()
    assert mgr.steps() == []  # nothing mixing two states was committed
    mgr.save(2, {"model": model, "opt": opt})  # the manager goes on working
    mgr.close()
    assert [s.step for s in mgr.steps()] == [2]


def test_optimizer_step_waits_for_the_copy(tmp_path) -> None:
    model = _model(frozen=False)
    opt = _opt(model)
    _train(model, opt)
    before = _clone(model)
    release, entered = threading.Event(), threading.Event()

    def hold(key: str) -> None:
        entered.set()
        assert release.wait(10)

    overlap.set_copy_hook(hold)
    mgr = CheckpointManager(tmp_path, snapshot="overlap")
    mgr.save(1, {"model": model, "opt": opt})
    assert entered.wait(10)
    model(torch.randn(8, 32)).pow(2).mean().backward()  # forward/backward overlap the copy
    stepper = threading.Thread(target=opt.step)
    stepper.start()
    stepper.join(0.3)
    assert stepper.is_alive()  # the optimizer step is held until the copy is done
    release.set()
    stepper.join(10)
    assert not stepper.is_alive()
    mgr.close()
    saved = torchkeep.load(tmp_path)["objects"]["model"]
    for key, value in before.items():
        assert torch.equal(saved[key], value), key


def test_buffers_are_copied_before_save_returns(tmp_path) -> None:
    model = _model(frozen=False)
    opt = _opt(model)
    _train(model, opt)
    before = _clone(model)

    def forward(key: str) -> None:  # BatchNorm statistics change in forward, without a version
        overlap.set_copy_hook(None)  # bump: they must have been copied already
        model(torch.randn(8, 32))

    overlap.set_copy_hook(forward)
    with CheckpointManager(tmp_path, snapshot="overlap") as mgr:
        mgr.save(1, {"model": model, "opt": opt})
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    saved = torchkeep.load(tmp_path)["objects"]["model"]
    for key, value in before.items():
        assert torch.equal(saved[key], value), key


def test_snapshot_mode_is_checked(tmp_path) -> None:
    with pytest.raises(torchkeep.TorchkeepError, match="snapshot="):
        CheckpointManager(tmp_path, snapshot="later")
    assert CheckpointManager(tmp_path, async_save=True).snapshot == "copy"
    assert CheckpointManager(tmp_path).snapshot == "sync"


# ---------------------------------------------------------------------------- incremental steps
@pytest.mark.parametrize("snapshot", ["sync", "copy", "overlap"])
def test_incremental_steps_skip_frozen_and_restore_exactly(tmp_path, snapshot: str) -> None:
    model = _model()
    opt = _opt(model)
    mgr = CheckpointManager(tmp_path, snapshot=snapshot, incremental=True, keep_last=2)
    for step in range(4):
        _train(model, opt)
        mgr.save(step, {"model": model, "opt": opt})
    mgr.close()
    expected = _clone(model)
    sizes = {s.step: s.size for s in mgr.steps()}
    frozen = sum(p.numel() * 4 for p in model[0].parameters())
    assert set(sizes) == {0, 2, 3}  # step 0 holds the frozen bytes the kept steps use
    assert sizes[0] - sizes[3] >= frozen // 2  # minus the reference records in the header
    with FileReader(os.path.join(tmp_path, "step-0000000003", "state.tk")) as reader:
        assert {r.step for r in reader.links.refs.values()} == {0}
        assert not reader.corrupt_entries()
    fresh = _model()
    fresh_opt = _opt(fresh)
    assert CheckpointManager(tmp_path).restore({"model": fresh, "opt": fresh_opt}) == 3
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key
    loaded = torchkeep.load(tmp_path)["objects"]["model"]
    assert torch.equal(loaded["0.weight"], expected["0.weight"])
    step3 = os.path.join(tmp_path, "step-0000000003")
    assert torchkeep.verify(os.path.join(step3, "state.tk")) == []
    runner = CliRunner()
    for args in (["verify", str(tmp_path)], ["inspect", step3]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    out = os.path.join(tmp_path, "..", f"{snapshot}.safetensors")
    assert runner.invoke(cli, ["convert", step3, out]).exit_code == 0
    with safe_open(out, "pt") as f:
        assert torch.equal(f.get_tensor("objects.model.0.weight"), expected["0.weight"])


@pytest.mark.parametrize("entry", ["load_state_dict", "restore", "load", "verify"])
def test_corrupt_bytes_held_for_a_later_step_are_caught_there(tmp_path, entry: str) -> None:
    """A step's referenced tensor is verified in the earlier step's file by every reader, and a
    verified load_state_dict refuses it before changing the model."""
    model = _model()
    opt = _opt(model)
    with CheckpointManager(tmp_path, incremental=True) as mgr:
        for step in range(2):
            _train(model, opt)
            mgr.save(step, {"model": model, "opt": opt})
    first = os.path.join(tmp_path, "step-0000000000", "state.tk")
    with FileReader(first) as reader:
        info = reader.entry("objects.model.0.weight")
        at = reader.header.data_start + info.begin + info.nbytes // 3
    with open(first, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x08]))
    second = os.path.join(tmp_path, "step-0000000001", "state.tk")
    target = _model()
    before = _clone(target)
    if entry == "verify":
        assert torchkeep.verify(second) == ["objects.model.0.weight"]
        return
    calls = {
        "load_state_dict": lambda: torchkeep.load_state_dict(target, second, key="objects.model"),
        "restore": lambda: CheckpointManager(tmp_path).restore({"model": target}, step=1),
        "load": lambda: torchkeep.load(second),
    }
    with pytest.raises(torchkeep.CorruptionError, match="step-0000000000.*0.weight"):
        calls[entry]()
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_changed_frozen_tensor_is_rewritten_and_old_step_released(tmp_path) -> None:
    model = _model()
    opt = _opt(model)
    mgr = CheckpointManager(tmp_path, incremental=True, keep_last=1)
    mgr.save(0, {"model": model, "opt": opt})
    mgr.save(1, {"model": model, "opt": opt})
    assert mgr.kept_reasons() == {0: ["referenced by 1"], 1: ["last"]}
    listed = CliRunner().invoke(cli, ["ls", str(tmp_path), "--json"])
    assert listed.exit_code == 0, listed.output
    assert [r["kept"] for r in json.loads(listed.output)["steps"]] == [
        ["referenced by 1"],
        ["last"],
    ]
    with torch.no_grad():
        model[0].weight.mul_(2)  # a version bump: written again
        model[0].bias.mul_(2)
    mgr.save(2, {"model": model, "opt": opt})
    mgr.close()
    assert [s.step for s in mgr.steps()] == [2]  # nothing kept refers to 0 or 1 any more
    loaded = torchkeep.load(tmp_path)["objects"]["model"]
    assert torch.equal(loaded["0.weight"], model[0].weight)


def test_verify_unchanged_catches_writes_through_data(tmp_path) -> None:
    model = _model()
    opt = _opt(model)
    mgr = CheckpointManager(tmp_path, incremental=True, verify_unchanged=True)
    mgr.save(0, {"model": model, "opt": opt})
    model[0].weight.data.add_(1.0)  # .data has its own version counter: invisible to the guard
    with pytest.warns(UserWarning, match="without a version-counter bump"):
        mgr.save(1, {"model": model, "opt": opt})
    mgr.close()
    loaded = torchkeep.load(tmp_path)["objects"]["model"]
    assert torch.equal(loaded["0.weight"], model[0].weight)


# ------------------------------------------------------------------------ hostile references
def _step_file(run, step: int, obj: dict, refs: dict[str, TensorRef] | None = None) -> str:
    folder = os.path.join(run, f"step-{step:010d}")
    os.makedirs(folder, exist_ok=True)
    prepared = prepare(obj)
    if refs:
        entries = [e for e in prepared.entries if e.key not in refs]
        offset = 0
        for e in entries:
            e.begin, e.end = offset, offset + e.nbytes
            offset = e.end
        prepared = PreparedFile(entries, prepared.tree, {REFS_KEY: encode_refs(refs)})
    return write_file(prepared, os.path.join(folder, "state.tk"))


def _ref_to(base: str, **change: object) -> dict[str, TensorRef]:
    with FileReader(base) as reader:
        info = reader.entry("a")
        fields = dict(
            step=0,
            key="a",
            dtype=info.dtype,
            shape=tuple(info.shape),
            offset=info.begin,
            nbytes=info.nbytes,
            checksum=reader.checksums["a"],
        )
    fields.update(change)
    return {"a": TensorRef(**fields)}


def test_a_valid_reference_resolves(tmp_path) -> None:
    base = _step_file(tmp_path, 0, {"a": torch.arange(10.0), "b": torch.ones(3)})
    path = _step_file(tmp_path, 1, {"a": torch.zeros(10), "b": torch.ones(3)}, _ref_to(base))
    assert torch.equal(torchkeep.load(path)["a"], torch.arange(10.0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": 9}, "not earlier than its own step"),
        ({"step": 7}, "not in the run directory"),
        ({"key": "b"}, "dtype/shape/offset/size differ"),
        ({"key": "zz"}, "does not hold"),
        ({"offset": 8}, "dtype/shape/offset/size differ"),
        ({"checksum": "0123456789abcdef"}, "checksum recorded here"),
        ({"shape": (5,), "nbytes": 20}, "dtype/shape/offset/size differ"),
    ],
)
def test_hostile_references_raise_format_error(tmp_path, change: dict, message: str) -> None:
    base = _step_file(tmp_path, 0, {"a": torch.arange(10.0), "b": torch.ones(3)})
    refs = _ref_to(base, **change)
    path = _step_file(tmp_path, 9, {"a": torch.zeros(10), "b": torch.ones(3)}, refs)
    with pytest.raises(FormatError, match=message) as info:
        torchkeep.load(path)
    assert "step-0000000009" in str(info.value)


def test_reference_through_a_link_or_from_outside_a_run_is_refused(tmp_path) -> None:
    outside = tmp_path / "elsewhere"
    base = _step_file(outside, 0, {"a": torch.arange(10.0)})
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(os.path.dirname(base), run / "step-0000000000")  # a planted link to elsewhere
    path = _step_file(run, 1, {"a": torch.zeros(10)}, _ref_to(base))
    with pytest.raises(UnsafePathError, match="not a plain step directory"):
        torchkeep.load(path)
    loose = tmp_path / "loose.tk"
    os.rename(path, loose)
    with pytest.raises(FormatError, match="not inside a step directory"):
        torchkeep.load(loose)


def test_malformed_reference_table_is_a_format_error(tmp_path) -> None:
    folder = tmp_path / "step-0000000001"
    folder.mkdir()
    prepared = prepare({"b": torch.ones(3)})
    prepared = PreparedFile(prepared.entries, prepared.tree, {REFS_KEY: '{"format": 1}'})
    write_file(prepared, str(folder / "state.tk"))
    with pytest.raises(FormatError, match="torchkeep.refs"):
        torchkeep.load(folder / "state.tk")
