"""LoadReport: what loading a state dict into a live object did, as data and as a table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """Outcome of :func:`torchkeep.load_state_dict`.

    ``missing``: keys the model has and the checkpoint lacks; ``unexpected``: the reverse;
    ``shape_mismatches``: (key, checkpoint shape, model shape), not loaded; ``dtype_changes``:
    (key, checkpoint dtype, model dtype), loaded with a cast; ``notes``: key normalizations;
    ``tied``: keys loaded through the tensor they share.
    """

    source: str = "<mapping>"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    dtype_changes: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: (key, loaded key): keys the checkpoint lacks that are the same tensor as a loaded key
    #: (tied weights, e.g. ``lm_head.weight`` and the input embedding); not counted as missing.
    tied: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key matched in name and shape (dtype casts are allowed)."""
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def rows(self) -> list[tuple[str, str, str]]:
        """(problem, key, detail) rows of the mismatch table."""
        rows = [("missing in checkpoint", k, "") for k in self.missing]
        rows += [("unexpected in checkpoint", k, "") for k in self.unexpected]
        rows += [
            ("shape mismatch", k, f"checkpoint {list(a)} vs model {list(b)}")
            for k, a, b in self.shape_mismatches
        ]
        rows += [("tied (loaded)", k, f"same tensor as {twin}") for k, twin in self.tied]
        rows += [
            ("dtype cast", k, f"checkpoint {a} -> model {b}") for k, a, b in self.dtype_changes
        ]
        return rows

    def table(self, limit: int = 40) -> str:
        """A readable fixed-width table of every problem (first ``limit`` rows)."""
        rows = self.rows()
        if not rows:
            return "all keys matched"
        width_a = max(len(r[0]) for r in rows)
        width_b = max(len(r[1]) for r in rows[:limit])
        lines = [f"{a:<{width_a}}  {b:<{width_b}}  {c}".rstrip() for a, b, c in rows[:limit]]
        if len(rows) > limit:
            lines.append(f"... and {len(rows) - limit} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"loaded {len(self.loaded)} tensors from {self.source}"
        parts = [head, *self.notes]
        if self.rows():
            parts.append(self.table())
        return "\n".join(parts)
