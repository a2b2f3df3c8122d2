"""Containers of the symbolic pickle machine, and the hashes of the keys put into them.

An unpickler builds dicts and sets itself (``SETITEM(S)``, ``ADDITEMS``, ``DICT``,
``FROZENSET``, ``set(list)`` and ``OrderedDict(pairs)`` through ``REDUCE``), and inserting n keys
that share one hash costs O(n^2): ints hash predictably (``hash(n) == n mod (2**61 - 1)``), and
so do floats, tuples of them and - in this process - strings and bytes. So the machine gives
every dict, set, list and tuple its own symbol (:class:`Box`, :class:`Tup`), computes the hash a
key will have when it can (:func:`key_hash`) and counts, per container, how many keys share a
hash (:class:`~torchkeep.format.bounds.HashTally`, linear time). Opaque keys (objects a global
made) have no predictable hash and are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import knobs
from ..format.bounds import HashTally, flooded

_HASHED_AS_IS = (int, float, str, bytes, bool, type(None))
_MAX_FIELDS = 8
#: Globals that build a dict or set from their first (``defaultdict``: second) argument.
SET_FROM = {"builtins.set": 0, "builtins.frozenset": 0, "collections.Counter": 0}
DICT_FROM = {"builtins.dict": 0, "collections.OrderedDict": 0, "collections.defaultdict": 1}


class Box:
    """One list, dict, set or frozenset the pickle builds (each its own symbol)."""

    __slots__ = ("elems", "fields", "kind", "tally")

    def __init__(self, kind: str, elems: list[Any] | None = None) -> None:
        self.kind = kind
        self.tally = HashTally()
        self.elems = elems if kind == "list" else None  # a list's items, by reference
        # A small dict's string keys and values: the state BUILD gives an object (see below).
        self.fields: dict[str, Any] | None = {} if kind == "dict" else None

    def record(self, pairs: list[Any]) -> None:
        """Remember ``pairs`` (key, value, key, value...) while the dict has few string keys."""
        fields = self.fields
        if fields is None:
            return
        for key, value in zip(pairs[0::2], pairs[1::2]):
            if type(key) is str:
                fields[key] = value
        if len(fields) > _MAX_FIELDS:
            self.fields = None

    def __repr__(self) -> str:
        return f"<{self.kind}>"


class _Hash:
    """Stands in for a tuple item whose hash is known, so ``hash(tuple)`` comes out exact."""

    __slots__ = ("h",)

    def __init__(self, h: int) -> None:
        self.h = h

    def __hash__(self) -> int:
        return self.h


class Tup:
    """One tuple the pickle builds: its items (by reference) and its hash when predictable."""

    __slots__ = ("h", "items", "kind")

    def __init__(self, items: list[Any]) -> None:
        self.kind = "tuple"
        self.items = items
        self.h: int | None | object = _UNSET  # computed when first used as a key


_UNSET = object()


def _resolve(tup: Tup) -> int | None:
    """The hash of ``tup``, computed once; nested tuples first, with a stack (no recursion)."""
    stack = [tup]
    while stack:
        top = stack[-1]
        pending = [i for i in top.items if type(i) is Tup and i.h is _UNSET]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        top.h = _tuple_hash(top.items)
    return tup.h  # type: ignore[return-value]

    def __repr__(self) -> str:
        return "<tuple>"


def _tuple_hash(items: list[Any]) -> int | None:
    """``hash(tuple(items))`` from the items' hashes; None at the first unpredictable item.

    Nested tuples' hashes are already resolved (:func:`_resolve`) and reused, so a key
    nested many levels deep costs no recursion and each tuple is hashed once.
    """
    hashes = []
    for item in items:
        kind = type(item)
        if kind in _HASHED_AS_IS:
            hashes.append(_Hash(hash(item)))
        elif kind is Tup and item.h is not None:
            hashes.append(_Hash(item.h))
        else:
            return None
    return hash(tuple(hashes))


def key_hash(value: Any, objects: dict[int, tuple[Any, int]] | None = None) -> int | None:
    """The hash ``value`` will have in the unpickler, or None when it cannot be known here.

    ``objects`` holds the hashes of objects globals made (by ``id``), where they are known.
    """
    if type(value) in _HASHED_AS_IS:
        return hash(value)
    if type(value) is Tup:
        return _resolve(value) if value.h is _UNSET else value.h  # type: ignore[return-value]
    if objects:
        known = objects.get(id(value))
        return known[1] if known is not None and known[0] is value else None
    return None


def known_hashes(keys: Iterable[Any], objects: dict[int, tuple[Any, int]]) -> Iterable[int]:
    """The predictable hashes among ``keys``."""
    return (h for h in (key_hash(k, objects) for k in keys) if h is not None)


def size_hash(args: Any) -> int | None:
    """``hash(torch.Size(t))`` is ``hash(t)``: from ``REDUCE(torch.Size, (t,))``'s arguments."""
    items = items_of(args)
    return key_hash(items[0]) if items is not None and len(items) == 1 else None


def index_hash(state: Any, objects: dict[int, tuple[Any, int]]) -> int | None:
    """``hash(MetadataIndex)`` is ``hash((fqn, offset))``: from the state BUILD gives it.

    DCP metadata keys ``storage_data`` by these; one fqn with colliding offsets floods it.
    """
    if type(state) is not Box or not state.fields:
        return None
    parts = [key_hash(state.fields.get(name), objects) for name in ("fqn", "offset")]
    return None if None in parts else hash(tuple(map(_Hash, parts)))  # type: ignore[arg-type]


#: Globals whose instances hash predictably, and how (see :func:`size_hash`, :func:`index_hash`).
SIZE = "torch.Size"
METADATA_INDEX = "torch.distributed.checkpoint.metadata.MetadataIndex"


def items_of(value: Any) -> list[Any] | None:
    """What iterating a list or tuple symbol yields, or None for anything else."""
    if type(value) is Tup:
        return value.items
    if type(value) is Box and value.elems is not None:
        return value.elems
    return None


def pair_keys(pairs: list[Any]) -> Iterable[Any]:
    """The first items of the 2-item tuples/lists among ``pairs`` (``dict(pairs)``'s keys)."""
    for pair in pairs:
        items = items_of(pair)
        if items is not None and len(items) == 2:
            yield items[0]


def constructor_keys(ref: str, args: Any) -> list[Any] | None:
    """The keys ``ref(*args)`` inserts when ``ref`` builds a dict or set from an iterable."""
    index = SET_FROM.get(ref, DICT_FROM.get(ref))
    arg_items = items_of(args)
    if index is None or arg_items is None or len(arg_items) <= index:
        return None
    source = items_of(arg_items[index])
    if source is None:
        return None
    return source if ref in SET_FROM else list(pair_keys(source))


FLOOD_MARK = "hash flooding"  # how every flooding problem starts


class FloodError(Exception):
    """More keys of one container share a hash than ``MAX_HASH_COLLISIONS`` allows."""


class Keys:
    """One pickle's key bookkeeping: tallies of objects globals made (``OrderedDict``,
    ``Counter``...) and the hashes of objects that can be keys (``torch.Size``...), by ``id``
    (each entry keeps its object alive, so an ``id`` is never reused while it is here)."""

    def __init__(self) -> None:
        self.tallies: dict[int, tuple[Any, HashTally]] = {}
        self.hashes: dict[int, tuple[Any, int]] = {}

    def tally(self, target: Any, keys: list[Any]) -> None:
        """Count the hashes of ``keys`` inserted into ``target``; refuse a flood."""
        if type(target) is Box:
            tally = target.tally
        else:
            tally = self.tallies.setdefault(id(target), (target, HashTally()))[1]
        shared = tally.add(known_hashes(keys, self.hashes))
        if flooded(shared):
            what = target.kind if type(target) is Box else getattr(target, "ref", "object")
            raise FloodError(
                f"{FLOOD_MARK}: {shared} keys of one {what} share one hash (over the limit of "
                f"{knobs.MAX_HASH_COLLISIONS}; building it would take quadratic time); raise "
                "TORCHKEEP_MAX_HASH_COLLISIONS if this file is legitimate"
            )

    def _known(self, obj: Any, h: int | None) -> None:
        if h is not None:
            self.hashes[id(obj)] = (obj, h)

    def built(self, target: Any, state: Any) -> None:
        """BUILD gave ``target`` (an object ``target.ref`` made) ``state``."""
        if target.ref == METADATA_INDEX:
            self._known(target, index_hash(state, self.hashes))

    def called(self, ref: str, result: Any, args: Any) -> int:
        """``ref(*args)`` made ``result``: count the keys it inserts; how many there were."""
        if ref == SIZE:
            self._known(result, size_hash(args))
        keys = constructor_keys(ref, args)
        if keys:
            self.tally(result, keys)
        return len(keys or ())
