"""Match checkpoint keys to model keys across DataParallel/DDP and torch.compile wrappers.

``module.`` (DataParallel, DistributedDataParallel) and ``_orig_mod.`` (torch.compile) are
wrapper segments: a key is compared by its canonical form with them removed, so a checkpoint
saved from a wrapped model loads into a bare one and the other way round.
"""

from __future__ import annotations

WRAPPERS = {"module": "DataParallel/DDP", "_orig_mod": "torch.compile"}


def canonical(key: str) -> str:
    """``module._orig_mod.fc.weight`` -> ``fc.weight``; leading ``module`` and any ``_orig_mod``."""
    parts = key.split(".")
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p != "_orig_mod") or key


def _wrappers_in(keys: list[str]) -> set[str]:
    found = set()
    for key in keys:
        parts = key.split(".")
        if parts and parts[0] == "module":
            found.add("module")
        if "_orig_mod" in parts:
            found.add("_orig_mod")
    return found


def match_keys(source: list[str], target: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map each target key to its source key; returns (target -> source, notes).

    Exact names win. Otherwise canonical forms are used when they are unique on both sides.
    """
    source_set = set(source)
    if set(target) <= source_set or not source:
        return {k: k for k in target if k in source_set}, []
    canon_src = {canonical(k): k for k in source}
    canon_tgt = {canonical(k): k for k in target}
    if len(canon_src) != len(source) or len(canon_tgt) != len(target):
        return {k: k for k in target if k in source_set}, []
    mapping = {t: canon_src[c] for c, t in canon_tgt.items() if c in canon_src}
    exact = sum(1 for t in target if t in source_set)
    if len(mapping) <= exact:
        return {k: k for k in target if k in source_set}, []
    return mapping, _notes(source, target)


def _notes(source: list[str], target: list[str]) -> list[str]:
    notes = []
    src, tgt = _wrappers_in(source), _wrappers_in(target)
    for segment, origin in WRAPPERS.items():
        if segment in src and segment not in tgt:
            notes.append(
                f"normalized keys: removed the '{segment}.' prefix ({origin}) of the checkpoint"
            )
        elif segment in tgt and segment not in src:
            notes.append(f"normalized keys: added the '{segment}.' prefix ({origin}) of the model")
    return notes or ["normalized keys across module wrappers"]
