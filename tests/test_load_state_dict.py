"""load_state_dict: in place, wrapper-prefix normalization, strict tables, paths and mappings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep import LoadReport, StateDictMismatchError


def make_model(seed: int = 0, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 1))


class Compiled(nn.Module):
    """Stands in for ``torch.compile``'s wrapper: parameters live under ``_orig_mod.``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pointers(model: nn.Module) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in model.state_dict().items()}


def assert_model_equals(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert set(current) == set(state)
    for key, value in state.items():
        assert torch.equal(current[key], value), key


@pytest.fixture(params=["path", "mapping"])
def source_kind(request):
    return request.param


def as_source(obj, kind, tmp_path):
    if kind == "mapping":
        return obj
    path = tmp_path / "src.tk"
    torchkeep.save(obj, path)
    return path


def test_loads_in_place_into_existing_tensors(tmp_path, source_kind):
    src = make_model(1)
    src[1].running_mean.uniform_()
    src[1].num_batches_tracked.fill_(17)
    dst = make_model(2)
    before = pointers(dst)
    report = torchkeep.load_state_dict(dst, as_source(src.state_dict(), source_kind, tmp_path))
    assert isinstance(report, LoadReport) and report.ok
    assert pointers(dst) == before  # same storage: written into, not replaced
    assert_model_equals(dst, snapshot(src))
    assert sorted(report.loaded) == sorted(dst.state_dict())


def test_unwraps_checkpoint_dict(tmp_path, source_kind):
    src = make_model(1)
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    ckpt = {"epoch": 90, "model_state": src.state_dict(), "optim_state": opt.state_dict()}
    dst = make_model(2)
    report = torchkeep.load_state_dict(dst, as_source(ckpt, source_kind, tmp_path))
    assert report.ok and any("model_state" in note for note in report.notes)
    assert_model_equals(dst, snapshot(src))


def test_explicit_key(tmp_path):
    src = make_model(1)
    path = as_source({"ema": {"weights": src.state_dict()}, "model": {}}, "path", tmp_path)
    dst = make_model(2)
    torchkeep.load_state_dict(dst, path, key="ema.weights")
    assert_model_equals(dst, snapshot(src))
    with pytest.raises(torchkeep.TorchkeepError, match="nope"):
        torchkeep.load_state_dict(dst, path, key="nope")


@pytest.mark.parametrize(
    "wrap_src, wrap_dst, segment",
    [
        (nn.DataParallel, lambda m: m, "module"),
        (lambda m: m, nn.DataParallel, "module"),
        (Compiled, lambda m: m, "_orig_mod"),
        (lambda m: m, Compiled, "_orig_mod"),
        (lambda m: nn.DataParallel(Compiled(m)), lambda m: m, "_orig_mod"),
    ],
    ids=["ddp-to-bare", "bare-to-ddp", "compiled-to-bare", "bare-to-compiled", "both-to-bare"],
)
def test_wrapper_prefixes_normalized(tmp_path, source_kind, wrap_src, wrap_dst, segment):
    src, dst = wrap_src(make_model(1)), wrap_dst(make_model(2))
    before = pointers(dst)
    report = torchkeep.load_state_dict(dst, as_source(src.state_dict(), source_kind, tmp_path))
    assert report.ok
    assert any(f"'{segment}.'" in note for note in report.notes), report.notes
    assert f"'{segment}.'" in str(report)
    assert pointers(dst) == before
    src_values = list(snapshot(src).values())
    assert all(torch.equal(a, b) for a, b in zip(src_values, snapshot(dst).values()))


def mismatched_source() -> dict[str, torch.Tensor]:
    state = make_model(1).state_dict()
    del state["2.bias"]  # missing
    state["extra.weight"] = torch.ones(2)  # unexpected
    state["0.weight"] = torch.ones(3, 6)  # shape mismatch (model has 8x6)
    state["0.bias"] = state["0.bias"].double()  # dtype difference (loaded with a cast)
    return state


def test_strict_raises_table_and_leaves_model_untouched(tmp_path, source_kind):
    dst = make_model(2)
    before = snapshot(dst)
    with pytest.raises(StateDictMismatchError) as info:
        torchkeep.load_state_dict(dst, as_source(mismatched_source(), source_kind, tmp_path))
    message = str(info.value)
    for needle in ("missing in checkpoint", "2.bias", "unexpected in checkpoint", "extra.weight",
                   "shape mismatch", "checkpoint [3, 6] vs model [8, 6]", "dtype cast",
                   "torch.float64 -> model torch.float32", "strict=False"):  # fmt: skip
        assert needle in message, needle
    report = info.value.report
    assert report.missing == ["2.bias"] and report.unexpected == ["extra.weight"]
    assert report.shape_mismatches == [("0.weight", (3, 6), (8, 6))]
    assert report.loaded == []
    assert_model_equals(dst, before)


def test_non_strict_loads_what_fits(tmp_path, source_kind):
    src_state = mismatched_source()
    dst = make_model(2)
    before = snapshot(dst)
    report = torchkeep.load_state_dict(
        dst, as_source(src_state, source_kind, tmp_path), strict=False
    )
    assert not report.ok
    assert report.missing == ["2.bias"] and report.unexpected == ["extra.weight"]
    assert report.dtype_changes == [("0.bias", "torch.float64", "torch.float32")]
    now = snapshot(dst)
    assert torch.equal(now["0.weight"], before["0.weight"])  # shape mismatch: untouched
    assert torch.equal(now["2.bias"], before["2.bias"])  # missing: untouched
    assert torch.equal(now["0.bias"], src_state["0.bias"].float())  # cast
    assert torch.equal(now["2.weight"], src_state["2.weight"])
    assert "0.weight" not in report.loaded and "2.weight" in report.loaded


def test_tied_weights_from_file(tmp_path):
    def tied(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        model[1].weight = model[0].weight
        return model

    src, dst = tied(1), tied(2)
    path = as_source(src.state_dict(), "path", tmp_path)
    report = torchkeep.load_state_dict(dst, path)
    assert report.ok and dst[1].weight is dst[0].weight
    assert torch.equal(dst[0].weight, src[0].weight)


def test_views_and_raw_dtypes_from_file(tmp_path):
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("z", torch.zeros(3, dtype=torch.complex128))
            self.register_buffer("row", torch.zeros(4))
            self.register_buffer("t", torch.zeros(4, 3))

    base = torch.randn(3, 4)
    src = {"z": torch.randn(3, dtype=torch.complex128), "row": base[1], "base": base, "t": base.t()}
    dst = Holder()
    report = torchkeep.load_state_dict(dst, as_source(src, "path", tmp_path), strict=False)
    assert report.unexpected == ["base"]
    assert torch.equal(dst.z, src["z"]) and torch.equal(dst.row, base[1])
    assert torch.equal(dst.t, base.t())


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("assign", [False, True])
def test_corrupt_file_leaves_the_model_untouched(tmp_path, where, assign):
    """A checksum failure in any tensor raises before the first byte reaches the model."""
    src = make_model(1).state_dict()
    path = as_source(src, "path", tmp_path)
    with torchkeep.open_file(path) as reader:
        entries = sorted(reader.header.entries.values(), key=lambda e: e.begin)
        start = reader.header.data_start
    entry = {"first": entries[0], "middle": entries[len(entries) // 2], "last": entries[-1]}[where]
    blob = bytearray(path.read_bytes())
    blob[start + entry.begin + entry.nbytes // 2] ^= 0x10
    path.write_bytes(bytes(blob))
    model = make_model(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    with pytest.raises(torchkeep.CorruptionError, match="corrupt"):
        torchkeep.load_state_dict(model, path, assign=assign)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [id(p) for p in model.parameters()] == params_before
    torchkeep.load_state_dict(make_model(2), path, verify=False)


def test_not_a_state_dict(tmp_path):
    with pytest.raises(torchkeep.TorchkeepError):
        torchkeep.load_state_dict(make_model(), as_source([1, 2], "path", tmp_path))
    with pytest.raises(torchkeep.TorchkeepError):
        torchkeep.load_state_dict(make_model(), {"state_dict": 5})


def test_a_tensor_named_like_a_wrapper_key_is_loaded_as_a_tensor(tmp_path) -> None:
    path = tmp_path / "wrapperish.tk"
    torchkeep.save({"model": torch.ones(2), "weight": torch.full((2, 2), 3.0), "step": 7}, path)
    target = torch.nn.Linear(2, 2, bias=False)
    report = torchkeep.load_state_dict(target, path, strict=False)
    assert report.loaded == ["weight"] and report.unexpected == ["model"]
    assert torch.equal(target.weight.detach(), torch.full((2, 2), 3.0))
