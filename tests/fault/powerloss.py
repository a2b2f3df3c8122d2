"""Replay a recorded save into the states a power loss could leave on disk.

The model (after LevelDB/RocksDB's fault-injection environments): file bytes survive only once
the file is fsynced; directory entries (creations, renames, deletions) survive only once their
directory is fsynced. A crash after operation ``p`` therefore leaves, for each file, its synced
bytes plus possibly some of the unsynced writes (a prefix, the last one torn), and for each
directory either its synced entries or (metadata journaled ahead of data) its current ones.
A third directory model follows an ordered metadata journal (ext4): any directory fsync makes
every earlier metadata operation durable, and a crash keeps a prefix of the later ones
(``journal:J`` keeps the first J operations).
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
    pending: list[tuple[int, bytes | None]] = field(default_factory=list)

    def content(self, mode: str) -> bytes:
        """The file's bytes: synced only, every write applied, or the last write torn in half
        (a truncation, ``data`` None, is all or nothing: torn means not applied)."""
        writes = self.pending
        if mode == "synced":
            writes = []
        elif mode == "torn" and writes:
            offset, data = writes[-1]
            writes = writes[:-1] + ([] if data is None else [(offset, data[: len(data) // 2])])
        out = bytearray(self.synced)
        for offset, data in writes:
            if data is None:
                out = out[:offset] + b"\0" * max(0, offset - len(out))
                continue
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
        self._initial = {id(d): (d, dict(d.current)) for d in _dirs(self.root)}
        self.journal: list[tuple] = []  # ("link", path, node) / ("move", src, dst) / ("drop", p)
        self.journal_synced = 0

    def journal_modes(self) -> list[str]:
        """The ``journal:J`` directory modes of the current crash point (strict prefixes)."""
        return [f"journal:{j}" for j in range(self.journal_synced, len(self.journal))]

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
            self.journal.append(("link", path, parent.current[name]))
        elif kind == "preallocate":
            fd, size = args
            if size > 0:
                self.fds[fd].pending.append((0, b"\0" * size))
        elif kind == "pwrite":
            fd, offset, data = args
            self.fds[fd].pending.append((offset, data))
        elif kind == "truncate":
            fd, size = args
            self.fds[fd].pending.append((size, None))
        elif kind == "fsync":
            self.fds[args[0]].sync()
        elif kind == "replace":
            src_parent, src_name = self._parent(args[0])
            dst_parent, dst_name = self._parent(args[1])
            dst_parent.current[dst_name] = src_parent.current.pop(src_name)
            self.journal.append(("move", args[0], args[1]))
        elif kind == "fsync_dir":
            node = self._node(args[0])
            node.synced = dict(node.current)
            self.journal_synced = len(self.journal)
        elif kind in ("unlink", "rmtree"):
            parent, name = self._parent(args[0])
            parent.current.pop(name)
            self.journal.append(("drop", args[0]))
        elif kind == "mkdir":
            parent, name = self._parent(args[0])
            parent.current[name] = Dir()
            self.journal.append(("link", args[0], parent.current[name]))
        elif kind != "close":
            raise ValueError(f"unknown operation {kind!r}")

    def materialize(self, out: str, dir_mode: str, data_mode: str) -> None:
        """Write the crash state chosen by the two modes into the empty directory ``out``."""
        if dir_mode.startswith("journal:"):
            entries = self._journal_entries(int(dir_mode.split(":")[1]))
            _write_tree(self.root, out, lambda d: entries.get(id(d), {}), data_mode)
        else:
            _write_tree(self.root, out, lambda d: getattr(d, dir_mode), data_mode)

    def _journal_entries(self, count: int) -> dict[int, dict]:
        """Directory entries after the initial state plus the first ``count`` journal ops."""
        entries = {key: dict(initial) for key, (_, initial) in self._initial.items()}

        def parent_of(path: str) -> tuple[dict, str]:
            parts = os.path.relpath(os.path.abspath(path), self.root_path).split(os.sep)
            node = self.root
            for part in parts[:-1]:
                node = entries[id(node)][part]
            return entries[id(node)], parts[-1]

        for op, *args in self.journal[:count]:
            if op == "link":
                table, name = parent_of(args[0])
                table[name] = args[1]
                if isinstance(args[1], Dir):
                    entries.setdefault(id(args[1]), {})
            elif op == "move":
                src, src_name = parent_of(args[0])
                dst, dst_name = parent_of(args[1])
                dst[dst_name] = src.pop(src_name)
            else:
                table, name = parent_of(args[0])
                table.pop(name)
        return entries


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


def _dirs(node: Dir) -> list[Dir]:
    found = [node]
    for child in node.current.values():
        if isinstance(child, Dir):
            found += _dirs(child)
    return found


def _write_tree(node: Dir, out: str, entries_of, data_mode: str) -> None:
    for name, child in entries_of(node).items():
        path = os.path.join(out, name)
        if isinstance(child, Dir):
            os.mkdir(path)
            _write_tree(child, path, entries_of, data_mode)
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
        modes = list(DIR_MODES) + sim.journal_modes()
        for dir_mode, data_mode in itertools.product(modes, DATA_MODES):
            yield p, dir_mode, data_mode
