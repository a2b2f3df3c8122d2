"""Replay a recorded save into the states a power loss could leave on disk.

The model (after LevelDB/RocksDB's fault-injection environments): file bytes survive only once
the file is fsynced; directory entries (creations, renames, deletions) survive only once their
directory is fsynced. A crash after operation ``p`` therefore leaves, for each file, its synced
bytes plus possibly some of the unsynced writes (a prefix, the last one torn), and for each
directory either its synced entries or (metadata journaled ahead of data) its current ones.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

DIR_MODES = ("synced", "current")
DATA_MODES = ("synced", "all", "torn")


@dataclass
class Inode:
    """A file: bytes known durable, and the writes made since its last fsync."""

    synced: bytes = b""
    pending: list[tuple[int, bytes]] = field(default_factory=list)

    def content(self, mode: str) -> bytes:
        writes = self.pending
        if mode == "synced":
            writes = []
        elif mode == "torn" and writes:
            offset, data = writes[-1]
            writes = writes[:-1] + [(offset, data[: len(data) // 2])]
        out = bytearray(self.synced)
        for offset, data in writes:
            if len(out) < offset + len(data):
                out.extend(b"\0" * (offset + len(data) - len(out)))
            out[offset : offset + len(data)] = data
        return bytes(out)

    def sync(self) -> None:
        self.synced = self.content("all")
        self.pending = []


@dataclass
class Dir:
    """A directory: entries known durable and current entries (name -> Inode or Dir)."""

    synced: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)


class SimFS:
    """The durable-state model of one directory tree, driven by a FaultOps log."""

    def __init__(self, root: str) -> None:
        self.root_path = os.path.abspath(root)
        self.root = _snapshot(self.root_path)
        self.fds: dict[int, Inode] = {}

    def _parent(self, path: str) -> tuple[Dir, str]:
        rel = os.path.relpath(os.path.abspath(path), self.root_path)
        parts = rel.split(os.sep)
        node = self.root
        for part in parts[:-1]:
            node = node.current[part]
        return node, parts[-1]

    def _node(self, path: str) -> Dir | Inode:
        if os.path.abspath(path) == self.root_path:
            return self.root
        parent, name = self._parent(path)
        return parent.current[name]

    def apply(self, record: tuple) -> None:
        """Apply one FaultOps log record to the model."""
        kind, *args = record
        if kind == "open_new":
            path, fd = args
            parent, name = self._parent(path)
            parent.current[name] = self.fds[fd] = Inode()
        elif kind == "preallocate":
            fd, size = args
            if size > 0:
                self.fds[fd].pending.append((0, b"\0" * size))
        elif kind == "pwrite":
            fd, offset, data = args
            self.fds[fd].pending.append((offset, data))
        elif kind == "fsync":
            self.fds[args[0]].sync()
        elif kind == "replace":
            src_parent, src_name = self._parent(args[0])
            dst_parent, dst_name = self._parent(args[1])
            dst_parent.current[dst_name] = src_parent.current.pop(src_name)
        elif kind == "fsync_dir":
            node = self._node(args[0])
            node.synced = dict(node.current)
        elif kind in ("unlink", "rmtree"):
            parent, name = self._parent(args[0])
            parent.current.pop(name)
        elif kind == "mkdir":
            parent, name = self._parent(args[0])
            parent.current[name] = Dir()
        elif kind != "close":
            raise ValueError(f"unknown operation {kind!r}")

    def materialize(self, out: str, dir_mode: str, data_mode: str) -> None:
        """Write the crash state chosen by the two modes into the empty directory ``out``."""
        _write_tree(self.root, out, dir_mode, data_mode)


def _snapshot(path: str) -> Dir:
    node = Dir()
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full):
            node.current[name] = _snapshot(full)
        else:
            with open(full, "rb") as handle:
                node.current[name] = Inode(handle.read())
    node.synced = dict(node.current)
    return node


def _write_tree(node: Dir, out: str, dir_mode: str, data_mode: str) -> None:
    entries = node.synced if dir_mode == "synced" else node.current
    for name, child in entries.items():
        path = os.path.join(out, name)
        if isinstance(child, Dir):
            os.mkdir(path)
            _write_tree(child, path, dir_mode, data_mode)
        else:
            with open(path, "wb") as handle:
                handle.write(child.content(data_mode))


def crash_states(sim: SimFS, log: list[tuple]) -> Iterator[tuple[int, str, str]]:
    """Yield ``(p, dir_mode, data_mode)`` for a crash after each prefix of ``log``.

    ``sim`` must have been built before the recorded save ran; it is advanced in place, so
    materialize each state before asking for the next.
    """
    for p in range(len(log) + 1):
        if p:
            sim.apply(log[p - 1])
        for dir_mode, data_mode in itertools.product(DIR_MODES, DATA_MODES):
            yield p, dir_mode, data_mode
