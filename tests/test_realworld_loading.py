"""Loading what users have: GPU-saved files, meta models, file objects, key paths, bad arguments
(issue 21 items 6-9 and 11)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.serialization as ser
from safetensors.torch import save as st_save
from safetensors.torch import save_file

import torchkeep
from torchkeep import TorchkeepError


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )


def _save_as_cuda(obj, target, **kwargs) -> None:
    """torch.save as a GPU machine writes it: every storage's location says ``cuda:0``."""
    original = ser.location_tag
    ser.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, target, **kwargs)
    finally:
        ser.location_tag = original


def _equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert x.device == y.device and torch.equal(x, y), name


# -- item 6: GPU-saved torch.save files into CPU models -----------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("zipped", [True, False])
@pytest.mark.parametrize(
    "wrap", [lambda s: s, lambda s: {"state_dict": s, "epoch": 2}, lambda s: {"model": s}]
)
def test_gpu_saved_torch_file_loads_into_cpu_model(tmp_path, zipped: bool, wrap) -> None:
    src = _net()
    path = str(tmp_path / "gpu.pt")
    _save_as_cuda(wrap(src.state_dict()), path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # the file really asks for a GPU
    dst = _net()
    report = torchkeep.load_state_dict(dst, path)
    assert report.ok and len(report.loaded) == len(src.state_dict())
    _equal_weights(src, dst)
    for location in ("cpu", torch.device("cpu"), {"cuda:0": "cpu"}, lambda s, loc: s):
        again = _net()
        torchkeep.load_state_dict(again, path, map_location=location)
        _equal_weights(src, again)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_saved_file_plain_load_says_to_map(tmp_path) -> None:
    path = str(tmp_path / "gpu.pt")
    _save_as_cuda({"w": torch.ones(2)}, path)
    with pytest.raises(TorchkeepError, match="map_location='cpu'"):
        torchkeep.load(path)
    assert torch.equal(torchkeep.load(path, map_location="cpu")["w"], torch.ones(2))


def test_read_location_follows_the_model() -> None:
    from torchkeep.state.placement import Placement

    assert Placement().read_location(_net()) == torch.device("cpu")
    assert Placement().read_location(_meta_net()) == torch.device("cpu")
    assert Placement(map_location="cuda:1").read_location(_net()) == "cuda:1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_gpu_files_and_models(tmp_path) -> None:
    src = _net().cuda()
    torch.save(src.state_dict(), str(tmp_path / "gpu.pt"))
    cpu = _net()
    assert torchkeep.load_state_dict(cpu, str(tmp_path / "gpu.pt")).ok
    _equal_weights(src.cpu(), cpu)
    torch.save(cpu.state_dict(), str(tmp_path / "cpu.pt"))
    gpu = _net().cuda()
    assert torchkeep.load_state_dict(gpu, str(tmp_path / "cpu.pt")).ok
    assert all(t.is_cuda for t in gpu.state_dict().values())
    _equal_weights(cpu, gpu.cpu())


# -- item 7: meta-device models --------------------------------------------------------------
def _meta_net() -> torch.nn.Module:
    with torch.device("meta"):
        return _net()


def _write(kind: str, tmp_path, state: dict) -> object:
    if kind == "mapping":
        return state
    path = str(tmp_path / f"w.{kind}")
    if kind == "tk":
        torchkeep.save(state, path)
    elif kind == "safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("kind", ["tk", "safetensors", "pt", "mapping"])
def test_meta_model_refused_without_assign(tmp_path, kind: str) -> None:
    source = _write(kind, tmp_path, _net().state_dict())
    model = _meta_net()
    with pytest.raises(TorchkeepError, match="meta device.*assign=True"):
        torchkeep.load_state_dict(model, source)
    assert all(p.device.type == "meta" for p in model.state_dict().values())


@pytest.mark.parametrize("kind", ["tk", "safetensors", "pt", "mapping"])
def test_meta_model_assign_makes_real_parameters(tmp_path, kind: str) -> None:
    src = _net()
    src[0].weight.requires_grad_(False)  # a frozen layer stays frozen
    source = _write(kind, tmp_path, src.state_dict())
    model = _meta_net()
    model[0].weight.requires_grad_(False)
    report = torchkeep.load_state_dict(model, source, assign=True)
    assert report.ok
    _equal_weights(src, model)
    assert isinstance(model[2].weight, torch.nn.Parameter) and model[2].weight.requires_grad
    assert not model[0].weight.requires_grad
    assert "running_mean" in model[1]._buffers and model[1].running_mean.device.type == "cpu"
    model(torch.randn(5, 4)).sum().backward()  # the model is usable for training
    assert model[2].weight.grad is not None


def test_assign_casts_to_model_dtype_and_keeps_ties(tmp_path) -> None:
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Embedding(6, 4), torch.nn.Linear(4, 6, bias=False))
    model[1].weight = model[0].weight  # tied, as language models do
    state = {"0.weight": torch.randn(6, 4, dtype=torch.float64)}
    path = str(tmp_path / "tied.tk")
    torchkeep.save(state, path)
    report = torchkeep.load_state_dict(model, path, assign=True)
    assert report.ok and report.tied == [("1.weight", "0.weight")]
    assert model[0].weight is model[1].weight and model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, state["0.weight"].float())


def test_assign_partial_load_notes_meta_leftovers(tmp_path) -> None:
    state = {k: v for k, v in _net().state_dict().items() if not k.startswith("2.")}
    model = _meta_net()
    report = torchkeep.load_state_dict(model, state, assign=True, strict=False)
    assert sorted(report.missing) == ["2.bias", "2.weight"]
    assert any("stay on the meta device" in n for n in report.notes)
    assert model[0].weight.device.type == "cpu" and model[2].weight.device.type == "meta"


def test_assign_strict_mismatch_changes_nothing() -> None:
    model = _meta_net()
    state = dict(_net().state_dict())
    del state["0.bias"]
    with pytest.raises(torchkeep.StateDictMismatchError):
        torchkeep.load_state_dict(model, state, assign=True)
    assert model[0].weight.device.type == "meta"


# -- item 8: file objects ----------------------------------------------------------------------
def test_save_and_load_bytesio_round_trip() -> None:
    obj = {"model": _net().state_dict(), "step": 7, "name": "run"}
    buffer = io.BytesIO()
    torchkeep.save(obj, buffer)
    assert buffer.getvalue()[8:9] == b"{"  # a safetensors header, written into the buffer
    buffer.seek(0)
    back = torchkeep.load(buffer)
    assert back["step"] == 7 and back["name"] == "run"
    assert all(torch.equal(back["model"][k], v) for k, v in obj["model"].items())


def test_open_binary_files(tmp_path) -> None:
    path = tmp_path / "f.tk"
    with open(path, "wb") as handle:
        torchkeep.save({"a": torch.arange(5)}, handle)
    with open(path, "rb") as handle:
        assert torch.equal(torchkeep.load(handle)["a"], torch.arange(5))
    model = _net()
    with open(tmp_path / "sd.tk", "wb") as handle:
        torchkeep.save(model.state_dict(), handle)
    fresh = _net()
    with open(tmp_path / "sd.tk", "rb") as handle:
        report = torchkeep.load_state_dict(fresh, handle)
    assert report.ok and report.source == "<BufferedReader>"
    _equal_weights(model, fresh)


@pytest.mark.parametrize("writer", ["torch-zip", "torch-legacy", "safetensors"])
def test_load_other_formats_from_bytesio(writer: str) -> None:
    model = _net()
    buffer = io.BytesIO()
    if writer == "safetensors":
        buffer.write(st_save(dict(model.state_dict())))
    else:
        torch.save(model.state_dict(), buffer, _use_new_zipfile_serialization=writer == "torch-zip")
    buffer.seek(0)
    loaded = torchkeep.load(buffer)
    assert set(loaded) == set(model.state_dict())
    buffer.seek(0)
    fresh = _net()
    assert torchkeep.load_state_dict(fresh, buffer).ok
    _equal_weights(model, fresh)


def test_load_reads_from_current_position() -> None:
    buffer = io.BytesIO(b"header-of-mine")
    buffer.seek(0, io.SEEK_END)
    torch.save({"x": torch.ones(3)}, buffer)
    buffer.seek(len(b"header-of-mine"))
    assert torch.equal(torchkeep.load(buffer)["x"], torch.ones(3))


class _Pipe(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.data.readinto(b)


def test_unseekable_and_text_streams_refused(tmp_path) -> None:
    buffer = io.BytesIO()
    torchkeep.save({"x": torch.ones(1)}, buffer)
    with pytest.raises(ValueError, match="cannot seek"):
        torchkeep.load(_Pipe(buffer.getvalue()))
    with pytest.raises(ValueError, match="cannot seek"):
        torchkeep.load_state_dict(_net(), _Pipe(buffer.getvalue()))
    with open(tmp_path / "t.txt", "w") as text, pytest.raises(TypeError, match="binary mode"):
        torchkeep.save({"x": torch.ones(1)}, text)
    buffer.seek(0)
    with pytest.raises(ValueError, match="mmap"):
        torchkeep.load(buffer, mmap=True)


def test_failed_load_leaves_stream_position() -> None:
    buffer = io.BytesIO(b"\x00" * 64)
    buffer.seek(5)
    with pytest.raises(TorchkeepError):
        torchkeep.load(buffer)
    assert buffer.tell() == 5


# -- item 9: key paths and prefixes ------------------------------------------------------------
class _Lit(torch.nn.Module):
    """A LightningModule-shaped wrapper: ``self.net`` plus a loss module with a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.loss = torch.nn.CrossEntropyLoss(weight=torch.ones(2))


def _lightning_ckpt() -> dict:
    lit = _Lit()
    return {"epoch": 1, "state_dict": lit.state_dict(), "optimizer_states": [{}]}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("layout", ["nested-mapping", "nested-tk", "flat-safetensors", "flat-tk"])
def test_key_selects_submodule_nested_or_flat(tmp_path, layout: str) -> None:
    ckpt = _lightning_ckpt()
    source: object = ckpt
    if layout != "nested-mapping":
        path = str(tmp_path / ("c.safetensors" if "safetensors" in layout else "c.tk"))
        data = ckpt if layout == "nested-tk" else _flat(ckpt)
        (save_file if path.endswith(".safetensors") else torchkeep.save)(data, path)
        source = path
    net = _net()
    report = torchkeep.load_state_dict(net, source, key="state_dict.net")
    assert report.ok and len(report.loaded) == len(net.state_dict()) == 9
    for k, v in net.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"net.{k}"])
    whole = (
        _Lit()
    )  # the full module from the flat file: its 'state_dict.' keys unwrap by themselves
    assert torchkeep.load_state_dict(whole, source).ok


@pytest.mark.parametrize("kind", ["mapping", "tk", "safetensors"])
def test_prefix_strips_on_request(tmp_path, kind: str) -> None:
    lit = _Lit()
    source = _write(kind, tmp_path, dict(lit.state_dict()))
    net = _net()
    report = torchkeep.load_state_dict(net, source, prefix="net.")
    assert report.ok and any("prefix 'net.'" in n for n in report.notes)
    _equal_weights(lit.net, net)
    with pytest.raises(TorchkeepError, match="no key starts with prefix 'head.'"):
        torchkeep.load_state_dict(_net(), source, prefix="head.")
    both = _net()
    assert torchkeep.load_state_dict(both, _lightning_ckpt(), key="state_dict", prefix="net.").ok


def test_submodule_named_model_is_not_a_wrapper(tmp_path) -> None:
    """HF-style keys ``model.layers...`` next to ``lm_head``: ``model.`` must not be stripped."""

    class Causal(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Linear(3, 3)
            self.lm_head = torch.nn.Linear(3, 5)

    src, dst = Causal(), Causal()
    path = str(tmp_path / "m.safetensors")
    save_file(dict(src.state_dict()), path)
    assert torchkeep.load_state_dict(dst, path).ok
    _equal_weights(src, dst)


def test_missing_key_path_names_what_is_there() -> None:
    with pytest.raises(TorchkeepError, match="no entry 'state_dict.head'.*top-level keys"):
        torchkeep.load_state_dict(_net(), _lightning_ckpt(), key="state_dict.head")


# -- item 11: argument errors ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"map_location": 5}, TypeError),
        ({"map_location": "nonsense"}, ValueError),
        ({"map_location": {"cpu": 3}}, TypeError),
        ({"map_location": ["cpu"]}, TypeError),
        ({"verify": "yes"}, TypeError),
        ({"mmap": 1}, TypeError),
    ],
)
def test_bad_arguments_are_argument_errors(tmp_path, kwargs: dict, error: type) -> None:
    path = str(tmp_path / "a.tk")
    torchkeep.save({"x": torch.ones(1)}, path)
    torch.save({"x": torch.ones(1)}, str(tmp_path / "a.pt"))
    for target in (path, str(tmp_path / "a.pt")):
        with pytest.raises(error) as info:
            torchkeep.load(target, **kwargs)
        assert not isinstance(info.value, torchkeep.FormatError)
        assert next(iter(kwargs)) in str(info.value)
    if "mmap" not in kwargs:
        with pytest.raises(error):
            torchkeep.load_state_dict(_net(), path, **kwargs)


def test_load_state_dict_argument_errors() -> None:
    with pytest.raises(TypeError, match="strict"):
        torchkeep.load_state_dict(_net(), {}, strict="no")
    with pytest.raises(TypeError, match="key"):
        torchkeep.load_state_dict(_net(), {}, key=3)
    with pytest.raises(TypeError, match="source"):
        torchkeep.load_state_dict(_net(), 42)
    with pytest.raises(ValueError, match="prefix"):
        torchkeep.load_state_dict(_net(), _net().state_dict(), prefix="")


@pytest.mark.parametrize("fmt", ["tk", "pt", "safetensors"])
def test_callable_map_location(tmp_path, fmt: str) -> None:
    state = {"w": torch.randn(3), "n": torch.tensor(4)}
    path = _write(fmt, tmp_path, state)
    seen = []

    def to_cpu(storage, location):
        seen.append(location)
        return storage

    loaded = torchkeep.load(path, map_location=to_cpu)
    assert seen and all(loc == "cpu" for loc in seen)
    assert torch.equal(loaded["w"], state["w"]) and loaded["w"].device.type == "cpu"
    keep = torchkeep.load(path, map_location=lambda storage, loc: None)
    assert torch.equal(keep["n"], state["n"])
    with pytest.raises(TypeError, match="callable returned"):
        if fmt == "pt":
            raise TypeError("callable returned: torch.load checks this itself")
        torchkeep.load(path, map_location=lambda storage, loc: "cpu")


def test_checkpoint_and_verify_with_file_objects() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 4)).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torchkeep.save_checkpoint(buffer, {"model": net, "optimizer": opt, "epoch": 4})
    assert torchkeep.verify(io.BytesIO(buffer.getvalue())) == []
    fresh = _net()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    buffer.seek(0)
    state = torchkeep.load_checkpoint(buffer, {"model": fresh, "optimizer": fresh_opt, "epoch": 0})
    assert state["epoch"] == 4
    _equal_weights(net, fresh)
    with pytest.raises(TypeError, match="open_file needs a path"):
        torchkeep.open_file(io.BytesIO(buffer.getvalue()))


class _Sink(io.RawIOBase):
    """A write-only stream that cannot seek (a pipe, a socket)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += bytes(b)
        return len(b)


def test_save_to_unseekable_stream() -> None:
    sink = _Sink()
    torchkeep.save({"w": torch.arange(6.0), "step": 3}, sink)
    back = torchkeep.load(io.BytesIO(bytes(sink.data)))
    assert back["step"] == 3 and torch.equal(back["w"], torch.arange(6.0))
