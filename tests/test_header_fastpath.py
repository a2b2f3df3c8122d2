"""The header's fast entry validation accepts exactly what the checked validation accepts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from torchkeep.errors import FormatError
from torchkeep.format import header

_DIMS = st.one_of(
    st.integers(min_value=-2, max_value=6),
    st.integers(min_value=2**31, max_value=2**64),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=2),
)
_OFFSET = st.one_of(st.integers(min_value=-3, max_value=2**65), st.booleans(), st.none())
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U8", "F8_E4M3", "C64", "X9", 3, None]),
        "shape": st.one_of(st.lists(_DIMS, max_size=5), st.integers(), st.none()),
        "data_offsets": st.one_of(
            st.lists(_OFFSET, min_size=0, max_size=3), st.tuples(_OFFSET, _OFFSET)
        ),
    },
    optional={"extra": st.integers()},
)


def _outcome(fn, value):
    try:
        return fn("k", value, "f.tk")
    except FormatError:
        return "rejected"


@settings(max_examples=600, deadline=None)
@given(_ENTRY, st.integers(min_value=0, max_value=64))
def test_fast_and_checked_validation_agree(value, begin):
    shape, offsets, dtype = value["shape"], value["data_offsets"], value["dtype"]
    small_dims = isinstance(shape, list) and all(type(d) is int and 0 <= d < 8 for d in shape)
    if isinstance(offsets, list) and len(offsets) == 2 and small_dims:
        # Often make the byte count consistent so the accepting branch is exercised too.
        size = header.ITEMSIZE.get(dtype, 1) if isinstance(dtype, str) else 1
        for d in shape:
            size *= d
        value["data_offsets"] = [begin, begin + size]
    assert _outcome(header._entry, value) == _outcome(header._entry_checked, value)


def test_fast_path_accepts_the_ordinary_entry():
    info = header._entry("w", {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]}, "f")
    assert info == header.EntryInfo("F32", (2, 3), 8, 32)
