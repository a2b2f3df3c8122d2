"""A symbolic pickle machine: what a pickle would import and call, found without running it.

The opcodes come from :func:`pickletools.genops` (which only parses); this module replays them
on a model of the unpickler's stack, mark stack and memo, the way CPython's ``Unpickler`` would,
but every value is a symbol: a string or int constant, a :class:`Global` (a name the pickle
imports), an :class:`Instance` (what calling or instantiating a global made) or an opaque value.
That makes every import exact (``STACK_GLOBAL`` operands are whatever the simulated stack holds,
memo gets included) and every call attributable to the global it calls. Anything the model cannot
resolve - a non-string ``STACK_GLOBAL`` operand, a call of a computed value, stack underflow, an
unknown opcode, a truncated stream, an unregistered extension code - is recorded as a problem,
and a pickle with a problem is unsafe. Sizes are bounded (:mod:`torchkeep.knobs`): the caller
hands over at most ``SCAN_MAX_PICKLE_BYTES`` (:mod:`.containers`), and the stack, marks and memo
together hold at most ``SCAN_MAX_PICKLE_OBJECTS`` entries. Every dict, set, list and tuple is its
own symbol (:mod:`.pickle_keys`), so the keys each dict or set receives can be counted by hash:
more than ``MAX_HASH_COLLISIONS`` alike (hash flooding, a quadratic load) is a problem too.
"""

from __future__ import annotations

import copyreg
import pickletools
import warnings
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass, field
from typing import IO, Any

from .. import knobs
from .pickle_keys import Box, FloodError, Keys, Tup


class ScanLimitError(Exception):
    """A pickle or container is larger than the scan's caps allow."""


@dataclass(frozen=True)
class Global:
    """A global the pickle imports (``module.qualname``)."""

    ref: str


@dataclass(frozen=True)
class Instance:
    """The result of calling or instantiating the global ``ref``."""

    ref: str


class _Opaque:
    """A value whose content never matters to the scan (numbers, bytes, containers...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<{self.kind}>"


BYTES, BUFFER, PERSISTENT = map(_Opaque, ("bytes", "buffer", "persistent"))
_MUTABLE = ("list", "dict", "set")
_STR_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE",
            "BINUNICODE", "BINUNICODE8"}  # fmt: skip
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}  # pushed as is: they can be keys
_EMPTY = {"EMPTY_LIST": "list", "EMPTY_DICT": "dict", "EMPTY_SET": "set"}
_FROM_MARK = {"LIST": "list", "DICT": "dict", "FROZENSET": "frozenset"}
_MEMO_INDEX_LIMIT = 2**32  # what LONG_BINPUT can spell; text PUT indices beyond it are refused
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


class PickleError(Exception):
    """The simulated unpickler would fail here, or the scan cannot resolve what happens."""


@dataclass
class Outcome:
    """What one pickle stream does: globals in first-seen order, problems, the final value."""

    globals: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    value: Any = None
    complete: bool = False  # reached STOP without a problem

    def add_global(self, ref: str) -> None:
        if ref not in self.globals:
            self.globals.append(ref)


def _fix_name(module: str, name: str, proto: int) -> tuple[str, str]:
    """Python 2 names map to Python 3 ones exactly as ``pickle.Unpickler.find_class`` does."""
    if proto < 3:
        if (module, name) in NAME_MAPPING:
            return NAME_MAPPING[(module, name)]
        if module in IMPORT_MAPPING:
            return IMPORT_MAPPING[module], name
    return module, name


class Machine:
    """The stack, mark stack and memo of one simulated unpickler."""

    def __init__(self, outcome: Outcome) -> None:
        self.out = outcome
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.keys = Keys()  # what dicts and sets the pickle builds hold, as hashes
        self.proto = 0
        self.size = 0
        self.max_size = knobs.SCAN_MAX_PICKLE_OBJECTS

    # -- stack primitives (the errors CPython's unpickler would raise) --
    def push(self, value: Any) -> None:
        self.size += 1
        if self.size > self.max_size:
            raise self.full()
        self.stack.append(value)

    def grow(self, n: int) -> None:
        """Count ``n`` more stack, mark or memo entries against the cap."""
        self.size += n
        if self.size > self.max_size:
            raise self.full()

    def full(self) -> ScanLimitError:
        return ScanLimitError(
            f"pickle holds more than {self.max_size} stack and memo entries (raise "
            "TORCHKEEP_SCAN_MAX_PICKLE_OBJECTS for a file you expect to be this large)"
        )

    def pop(self) -> Any:
        if not self.stack:
            raise PickleError("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise PickleError("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise PickleError("mark stack underflow (no MARK to pop)")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def global_(self, module: Any, name: Any, how: str) -> Global:
        if type(module) is not str or type(name) is not str:
            raise PickleError(f"{how} with operands that are not strings ({module!r}, {name!r})")
        module, name = _fix_name(module, name, self.proto)
        ref = f"{module}.{name}"
        self.out.add_global(ref)
        return Global(ref)

    def call(self, func: Any, how: str) -> Instance:
        """Calling or instantiating ``func``: only a global the pickle imported is resolvable."""
        if not isinstance(func, Global):
            raise PickleError(f"{how} calls {_describe(func)}, not an imported global")
        if func.ref not in self.out.calls:
            self.out.calls.append(func.ref)
        return Instance(func.ref)


def _describe(value: Any) -> str:
    if isinstance(value, Instance):
        return f"the result of {value.ref}(...)"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "an int"
    if isinstance(value, Global):
        return f"the global {value.ref} itself"
    kind = getattr(value, "kind", None)
    return f"a {kind}" if type(kind) is str else repr(type(value).__name__)


def _ext(m: Machine, code: Any) -> None:
    # The same registry the unpickler consults; private, so typeshed does not declare it.
    key = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
    if key is None:
        raise PickleError(f"extension code {code} is not registered (EXT opcode)")
    m.push(m.global_(key[0], key[1], f"extension code {code}"))


def _build(m: Machine) -> None:
    state = m.pop()
    target = m.top()
    if not isinstance(target, Instance):
        raise PickleError(f"BUILD sets state on {_describe(target)}, not an object a global made")
    m.keys.built(target, state)


def _fill(m: Machine, op: str) -> None:
    """APPEND(S)/SETITEM(S)/ADDITEMS: the target must be a container, never a global."""
    if op in ("APPENDS", "SETITEMS", "ADDITEMS"):
        items = m.pop_mark()
    else:
        items = [m.pop()]
        if op == "SETITEM":
            items.insert(0, m.pop())
    target = m.top()
    mutable = type(target) is Box and target.kind in _MUTABLE
    if not (mutable or isinstance(target, Instance)):
        raise PickleError(f"{op} on {_describe(target)}")
    if op.startswith("APPEND"):
        if mutable and target.elems is not None:
            target.elems.extend(items)
        return
    if op.startswith("SETITEM"):
        if mutable:
            target.record(items)
        m.keys.tally(target, items[0::2])
    else:
        m.keys.tally(target, items)


def _push_arg(m: Machine, arg: Any) -> None:
    m.push(arg)


def _mark(m: Machine, arg: Any) -> None:
    m.grow(1)
    m.marks.append(m.stack)
    m.stack = []


def _pop(m: Machine, arg: Any) -> None:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()  # CPython: POP on an empty stack discards the topmost mark


def _put(m: Machine, index: Any) -> None:
    if not 0 <= index < _MEMO_INDEX_LIMIT:  # a huge text PUT index could flood the memo dict
        raise PickleError(f"memo index {index} out of range")
    m.grow(index not in m.memo)
    m.memo[index] = m.top()


def _get(m: Machine, index: Any) -> None:
    if index not in m.memo:
        raise PickleError(f"memo index {index} was never stored")
    m.push(m.memo[index])


def _global(m: Machine, arg: Any) -> None:
    module, _, name = arg.partition(" ")
    m.push(m.global_(module, name, "GLOBAL"))


def _inst(m: Machine, arg: Any) -> None:
    module, _, name = arg.partition(" ")
    g = m.global_(module, name, "INST")  # CPython imports first, then pops the arguments
    m.pop_mark()
    m.push(m.call(g, "INST"))


def _stack_global(m: Machine, arg: Any) -> None:
    name, module = m.pop(), m.pop()
    m.push(m.global_(module, name, "STACK_GLOBAL"))


def _call_popping(n_args: int, how: str):
    def handler(m: Machine, arg: Any) -> None:
        for _ in range(n_args):
            m.pop()
        m.push(m.call(m.pop(), how))

    return handler


def _reduce(m: Machine, arg: Any) -> None:
    """REDUCE: ``set(list)``, ``OrderedDict(pairs)`` and the like insert keys; count them."""
    args = m.pop()
    func = m.pop()
    result = m.call(func, "REDUCE")
    m.grow(m.keys.called(func.ref, result, args))  # set(memoized list) again and again: memory
    m.push(result)


def _obj(m: Machine, arg: Any) -> None:
    items = m.pop_mark()
    if not items:
        raise PickleError("OBJ without a class")
    m.push(m.call(items[0], "OBJ"))


def _persid(n_pop: int):
    def handler(m: Machine, arg: Any) -> None:
        for _ in range(n_pop):
            m.pop()
        m.push(PERSISTENT)

    return handler


def _proto(m: Machine, arg: Any) -> None:
    if not 0 <= arg <= 5:
        raise PickleError(f"unsupported pickle protocol {arg}")
    m.proto = arg


def _const(value: Any):
    return lambda m, arg: m.push(value)


def _empty(kind: str):
    return lambda m, arg: m.push(Box(kind, []))


def _from_mark(kind: str):
    def handler(m: Machine, arg: Any) -> None:
        items = m.pop_mark()
        box = Box(kind, items)
        if kind == "dict":
            box.record(items)
        if kind != "list":
            m.keys.tally(box, items[0::2] if kind == "dict" else items)
        m.push(box)

    return handler


def _tuple(m: Machine, arg: Any) -> None:
    m.push(Tup(m.pop_mark()))


def _tuple_n(n: int):
    def handler(m: Machine, arg: Any) -> None:
        items = [m.pop() for _ in range(n)]
        items.reverse()
        m.push(Tup(items))

    return handler


def _nothing(m: Machine, arg: Any) -> None:
    return None


HANDLERS: dict[str, Any] = {
    **{op: _push_arg for op in _STR_OPS | _INT_OPS | _BYTES_OPS | {"FLOAT", "BINFLOAT"}},
    **{op: _const(value) for op, value in _CONSTANTS.items()},
    **{op: _empty(kind) for op, kind in _EMPTY.items()},
    **{op: _from_mark(kind) for op, kind in _FROM_MARK.items()},
    **{op: _tuple_n(n) for op, n in _TUPLE_N.items()},
    **{op: _put for op in ("PUT", "BINPUT", "LONG_BINPUT")},
    **{op: _get for op in ("GET", "BINGET", "LONG_BINGET")},
    **{
        op: lambda m, arg, op=op: _fill(m, op)
        for op in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS")
    },
    **{op: _ext for op in ("EXT1", "EXT2", "EXT4")},
    "BYTEARRAY8": _const(BYTES),
    "EMPTY_TUPLE": lambda m, arg: m.push(Tup([])),
    "TUPLE": _tuple,
    "MARK": _mark,
    "POP": _pop,
    "POP_MARK": lambda m, arg: m.pop_mark(),
    "DUP": lambda m, arg: m.push(m.top()),
    "MEMOIZE": lambda m, arg: _put(m, len(m.memo)),
    "GLOBAL": _global,
    "INST": _inst,
    "STACK_GLOBAL": _stack_global,
    "REDUCE": _reduce,  # pops the arguments, then the callable
    "NEWOBJ": _call_popping(1, "NEWOBJ"),
    "NEWOBJ_EX": _call_popping(2, "NEWOBJ_EX"),  # keyword and positional arguments
    "OBJ": _obj,
    "BUILD": lambda m, arg: _build(m),
    "PERSID": _persid(0),
    "BINPERSID": _persid(1),
    "NEXT_BUFFER": _const(BUFFER),
    "READONLY_BUFFER": lambda m, arg: m.top(),
    "PROTO": _proto,
    "FRAME": _nothing,
}


def _names_after(stream: IO[bytes], out: Outcome) -> None:
    """After an unresolvable step, still name the globals that GLOBAL/INST opcodes spell out."""
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                module, _, name = arg.partition(" ")
                out.add_global(".".join(_fix_name(module, name, 2)))
    except Exception:  # noqa: BLE001, S110 - the rest of a stream already reported unsafe
        pass


def simulate(stream: IO[bytes], outcome: Outcome | None = None) -> Outcome:
    """Replay one pickle (up to its STOP) from ``stream``; problems are recorded, not raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # genops warns about odd escapes in text pickles
        return _simulate(stream, outcome or Outcome())


def _simulate(stream: IO[bytes], out: Outcome) -> Outcome:
    machine = Machine(out)
    at: int | None = 0
    handlers = HANDLERS
    try:
        for opcode, arg, at in pickletools.genops(stream):  # noqa: B007 - ``at`` for messages
            name = opcode.name
            if name == "STOP":
                out.value = machine.pop()
                out.complete = True
                return out
            handler = handlers.get(name)
            if handler is None:
                raise PickleError(f"opcode {name} is not modelled")
            handler(machine, arg)
        out.problems.append("the stream ends before the pickle's STOP opcode")
    except ScanLimitError as exc:
        out.problems.append(str(exc))
    except (PickleError, FloodError) as exc:
        out.problems.append(f"{exc} (opcode at byte {at})")
        _names_after(stream, out)
    except Exception as exc:  # noqa: BLE001 - genops reports malformed streams many ways
        out.problems.append(f"malformed pickle near byte {at} ({type(exc).__name__}: {exc})")
    return out
