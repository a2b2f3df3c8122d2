"""Pickles built to fool a scanner that does not model the unpickler faithfully.

Each payload runs ``os.system("touch SENTINEL")`` when unpickled without restriction (the
positive control proves it), and names ``os.system`` (or ``posix.system``) in a way a heuristic
scanner misreads: every protocol, GLOBAL vs STACK_GLOBAL, operands through the memo, memoized
non-strings that shift memo indices, POP / POP_MARK / DUP decoys, INST, OBJ, NEWOBJ_EX, BUILD.
The container builders wrap a pickle as torch zips, nested zips, tar, legacy stream and
torch.export archives, and build zip bombs.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib

import torch

P = pickle


def _u(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4) of ``text``."""
    raw = text.encode()
    return P.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def _bu(text: str) -> bytes:
    raw = text.encode()
    return P.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _call(cmd: str) -> bytes:
    """``(cmd,)`` then REDUCE then STOP: the call of whatever callable is on the stack."""
    return _bu(cmd) + P.TUPLE1 + P.REDUCE + P.STOP


class _Reduce:
    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def protocol_variants(cmd: str) -> dict[str, bytes]:
    """``os.system(cmd)`` pickled by CPython with every protocol (0-1 have no PROTO header)."""
    evil = {"weights": [1.0, 2.0], "hook": _Reduce(os.system, cmd)}
    return {f"proto{p}": pickle.dumps(evil, protocol=p) for p in range(6)}


def trick_variants(cmd: str) -> dict[str, bytes]:
    """Hand-written opcode streams that hide the real global from a string heuristic."""
    head = P.PROTO + b"\x04"
    decoy = _u("collections") + _u("OrderedDict")
    return {
        # operands stored in the memo, fetched back with BINGET after decoy strings
        "memo_operands": head + _u("os") + P.MEMOIZE + P.POP + _u("system") + P.MEMOIZE
        + P.POP + decoy + P.POP + P.POP + P.BINGET + b"\x00" + P.BINGET + b"\x01"
        + P.STACK_GLOBAL + _call(cmd),
        # memoized non-strings first: a strings-only memo model shifts every index
        "memo_non_strings": head + P.EMPTY_DICT + P.MEMOIZE + P.EMPTY_LIST + P.MEMOIZE
        + P.POP + P.POP + _u("os") + P.MEMOIZE + _u("system") + P.MEMOIZE + P.POP + P.POP
        + decoy + P.MEMOIZE + P.POP + P.POP + P.BINGET + b"\x02" + P.BINGET + b"\x03"
        + P.STACK_GLOBAL + _call(cmd),
        # decoy strings pushed after the real ones and popped before STACK_GLOBAL
        "pop_decoys": head + _u("os") + _u("system") + decoy + P.POP + P.POP
        + P.STACK_GLOBAL + _call(cmd),
        # decoys inside a MARK, discarded by POP_MARK
        "pop_mark_decoys": head + _u("os") + _u("system") + P.MARK + decoy + P.POP_MARK
        + P.STACK_GLOBAL + _call(cmd),
        # POP on an empty stack discards the topmost mark (with the decoys under it)
        "pop_empty_pops_mark": head + _u("os") + _u("system") + P.MARK + P.POP
        + P.STACK_GLOBAL + _call(cmd),
        # DUP: the module string is duplicated and the copy popped after a decoy
        "dup_tricks": head + _u("os") + P.DUP + P.POP + _u("system") + P.DUP + _u("x")
        + P.POP + P.POP + P.STACK_GLOBAL + _call(cmd),
        # protocol-0 text pickle with PUT/GET of the callable (no PROTO header)
        "text_put_get": b"cos\nsystem\np0\n0(V" + cmd.encode() + b"\ntp1\n0g0\ng1\nR.",
        # INST and OBJ build by calling the class directly (no REDUCE)
        "inst": b"(V" + cmd.encode() + b"\nios\nsystem\n.",
        "obj": b"(cos\nsystem\nV" + cmd.encode() + b"\no.",
        # NEWOBJ_EX builds functools.partial(os.system, cmd); REDUCE then calls it
        "newobj_ex": head + _u("functools") + _u("partial") + P.STACK_GLOBAL + _u("os")
        + _u("system") + P.STACK_GLOBAL + _bu(cmd) + P.TUPLE2 + P.EMPTY_DICT + P.NEWOBJ_EX
        + P.EMPTY_TUPLE + P.REDUCE + P.STOP,
        # an allowed-looking BUILD: state set on a global (a function) instead of an object
        "build_on_global": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x03\x00\x00\x00"
        b"__x\x8a\x00sbcos\nsystem\n(V" + cmd.encode() + b"\ntR.",
        # Python 2 module name that the unpickler maps to os.system's module
        "py2_name": b"\x80\x02c__builtin__\neval\n(V__import__('os').system(" + repr(cmd).encode()
        + b")\ntR.",
    }  # fmt: skip


def ext_payload(code: int, cmd: str) -> bytes:
    """``os.system(cmd)`` through extension code ``code`` (EXT1/EXT2/EXT4 by size)."""
    if code < 256:
        op = P.EXT1 + bytes([code])
    elif code < 65536:
        op = P.EXT2 + struct.pack("<H", code)
    else:
        op = P.EXT4 + struct.pack("<i", code)
    return P.PROTO + b"\x02" + op + _call(cmd)


def torch_zip(pkl: bytes, extra: dict[str, bytes] | None = None) -> bytes:
    """A real torch zip (tensor records kept) whose data.pkl is ``pkl``, plus ``extra``."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            dst.writestr(name, data)
    return out.getvalue()


def nested_zip(inner: bytes, depth: int = 1, compress: bool = False) -> bytes:
    """``inner`` wrapped ``depth`` times as a member of a torch zip."""
    blob = inner
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    for level in range(depth):
        good = torch_zip(_stock_pickle())
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info))
            dst.writestr(f"archive/extra/nested{level}.pt", blob, compress_type=method)
        blob = out.getvalue()
    return blob


def _stock_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src:
        return src.read("archive/data.pkl")


def tar_file(pkl: bytes) -> bytes:
    """The legacy torch tar layout (storages, tensors, pickle) with ``pkl`` as its pickle."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("storages", pickle.dumps(0, 2)), ("tensors", pickle.dumps(0, 2)),
                           ("pickle", pkl)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def legacy_stream(pkl: bytes) -> bytes:
    """torch's legacy stream: magic, protocol, sys info, then ``pkl``, then the storage keys."""
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, 2)
    head = magic + pickle.dumps(1001, 2) + pickle.dumps({"little_endian": True}, 2)
    return head + pkl + pickle.dumps([], 2)


def replace_members(archive: bytes, replace: dict[str, bytes]) -> bytes:
    """A copy of a zip with members replaced or added (names relative to its top folder)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        top = src.namelist()[0].split("/", 1)[0]
        done = set()
        for info in src.infolist():
            rel = info.filename.split("/", 1)[1]
            data = replace.get(rel, src.read(info))
            done.add(rel)
            dst.writestr(info.filename, data)
        for rel, data in replace.items():
            if rel not in done:
                dst.writestr(f"{top}/{rel}", data)
    return out.getvalue()


def _deflated_zeros(body: bytes, size: int) -> tuple[bytes, int]:
    """Raw deflate of ``body`` + zeros up to ``size`` bytes, built from one repeated block."""
    block = bytes(1 << 24)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [comp.compress(body) + comp.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(body)
    # after a full flush the compressor forgets its window, so equal blocks deflate equally
    unit = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    count = (size - len(body)) // len(block)
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    out.extend([unit] * count)
    out.append(comp.flush())
    return b"".join(out), crc


def zip_bomb(member: str, size: int, body: bytes = b"\x80\x02") -> bytes:
    """A small zip whose ``member`` inflates to about ``size`` bytes (``body`` then zeros)."""
    data, crc = _deflated_zeros(body, size)
    real = len(body) + (size - len(body)) // (1 << 24) * (1 << 24)
    name = f"archive/{member}".encode()
    common = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0, crc, len(data), real)
    local = b"PK\x03\x04" + common + struct.pack("<HH", len(name), 0) + name
    central = (b"PK\x01\x02" + struct.pack("<H", 20) + common
               + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, 0) + name)  # fmt: skip
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central),
                                        len(local) + len(data), 0)  # fmt: skip
    return local + data + central + end
