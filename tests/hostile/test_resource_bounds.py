"""Issue 5: hostile headers, trees and the fuzz regression corpus, through every entry point
(library and CLI) in a fresh process under RLIMIT_AS, a per-call time bound and the audit hook.

tests/test_hostile_format.py checks the error types in-process; this suite adds the bounds:
no case may allocate its way past the memory cap, hang past the time bound, or run code.
"""

from __future__ import annotations

import glob
import json
import os

from forge import hostile_files
from guard import run_guarded

HERE = os.path.dirname(os.path.abspath(__file__))
#: Valid files in disguise: they decode to harmless values and may load.
MAY_LOAD = {"tree_complex_huge_ints", "tree_bytes_not_hex", "tree_device_bogus"}
#: A stride-0 view exposing 2**62 elements of one stored float: refused when the file is opened
#: by the expansion limit (knobs.MAX_EXPANSION; the view-size cap knobs.MAX_VIEW_ELEMENTS backs
#: it up wherever the tree is decoded), so no pass over it can run for ever.
#: tests/hostile/test_amplification.py covers the amplification classes of issue 18.
GIANT_VIEW = "tree_view_2_62_elements"


#: Entry points that read only the header and data (not the typed tree): a well-formed file
#: with a hostile tree passes them; the tree is refused when something decodes it.
LAZY = {"verify", "open_file", "cli scan"}


def _acceptable(result: dict) -> bool:
    """A typed refusal, or a load where loading is legitimate (fuzz corpus: only no crash)."""
    if result["typed"]:
        return True
    case, entry = result["case"], result["entry"]
    legit = case in MAY_LOAD or case.startswith("corpus/")
    legit = legit or (case.startswith("tree_") and entry in LAZY)
    return result["outcome"] == "ok" and legit


def test_hostile_files_are_refused_within_bounds(tmp_path) -> None:
    cases = {}
    for name, blob in hostile_files().items():
        path = tmp_path / name
        path.write_bytes(blob)
        cases[name] = {"path": str(path)}
    for path in sorted(glob.glob(os.path.join(HERE, "corpus", "*.bin"))):
        cases["corpus/" + os.path.basename(path)] = {"path": path}
    results = run_guarded(cases, tmp_path)
    bad = [r for r in results if r["events"] or r["sentinel"] or not _acceptable(r)]
    assert bad == [], json.dumps(bad[:10], indent=1)
    assert len(results) >= 14 * len(cases)


def test_giant_stride0_view_is_refused_everywhere(tmp_path) -> None:
    """The view-size cap refuses it in every entry point that decodes the tree, diff included."""
    path = tmp_path / GIANT_VIEW
    path.write_bytes(hostile_files()[GIANT_VIEW])
    entries = ["load", "cli inspect", "cli convert", "cli diff"]
    results = run_guarded({GIANT_VIEW: {"path": str(path), "entries": entries}}, tmp_path)
    assert {r["entry"] for r in results} == set(entries), results
    assert all(r["typed"] and "limit" in r["message"] for r in results), results
