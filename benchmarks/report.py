"""Turn benchmark rows into the table, the target checks and the scaling plot."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

GB = 1e9
MB = 1 << 20

TITLES = {
    "llm": "LLM-like (24 blocks, d=1024, 170 fp32 tensors)",
    "optim": "LLM-like with AdamW state",
    "small": "many small (20,000 tensors of 1-4 KB)",
    "huge": "one huge tensor",
}
#: The device's write limit (benchmarks/ceiling.py: O_DIRECT threads, fio-like); the ``x ceiling``
#: column and the ceiling targets compare saves against it.
DEVICE_CEILING = CEILING = "device ceiling (O_DIRECT threads+fsync)"
#: A buffered os.write loop + fsync over the same bytes: a reference, not a ceiling. Runs up to AF
#: reported it under OLD_CEILING as "the disk ceiling"; their rows keep that name.
BUFFERED_WRITE = "buffered os.write+fsync"
OLD_CEILING = "disk ceiling (os.write+fsync)"
TK_SAVE = "torchkeep.save"
TK_LOAD = "torchkeep verify=True"
#: Row (kind "floor") of one plain memory copy of the LLM-like tensors (cached stores), measured
#: right after ``torchkeep.save_async`` in its process: the snapshot a plain copy would make.
COPY_FLOOR = "bare memory copy (Tensor.copy_)"


class Stats:
    """Median/best of one (workload, size, op, cache) cell."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        # Warm loads timed side by side with their peers (worker.side_by_side) give the cell's
        # seconds; the same loads in the family's own process give only its peak RSS.
        timed = [r for r in rows if r.get("side_by_side")] or rows
        seconds = [r["seconds"] for r in timed]
        self.median = statistics.median(seconds)
        self.best = min(seconds)
        self.n = len(seconds)
        self.bytes = rows[0]["bytes"]
        # Each async row holds several saves' blocked times (contenders.ASYNC_SAMPLES); rows
        # from before that change hold one.
        blocked = [
            b
            for r in rows
            if r.get("blocked") is not None
            for b in r.get("blocked_samples") or [r["blocked"]]
        ]
        self.blocked = statistics.median(blocked) if blocked else None
        peaks = [r["peak_extra"] for r in rows if r.get("peak_extra") is not None]
        self.peak = statistics.median(peaks) if peaks else None
        # The same peak split into private (anonymous) and file-mapped pages (memsplit.py).
        self.peak_anon = _median_of(rows, "peak_anon")
        self.peak_file = _median_of(rows, "peak_file")

    @property
    def gbps(self) -> float:
        return self.bytes / self.median / GB


def _median_of(rows: list[dict], field: str) -> float | None:
    values = [r[field] for r in rows if r.get(field) is not None]
    return statistics.median(values) if values else None


def aggregate(rows: list[dict]) -> dict[tuple, Stats]:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["workload"], r["size"], r["kind"], r["op"], r["cache"])].append(r)
    return {k: Stats(v) for k, v in cells.items()}


def _fmt_peak(stats: Stats) -> str:
    if stats.peak is None:
        return "-"
    return f"{stats.peak / MB:,.0f} MB ({100 * stats.peak / max(1, stats.bytes):.0f}%)"


def fmt_split(stats: Stats) -> str:
    """``private / file-mapped`` peak, in MB and % of the checkpoint ("-" if not measured)."""
    if stats.peak_anon is None or stats.peak_file is None:
        return "-"
    size = max(1, stats.bytes)
    return (
        f"{stats.peak_anon / MB:,.0f} MB ({100 * stats.peak_anon / size:.0f}%) / "
        f"{stats.peak_file / MB:,.0f} MB ({100 * stats.peak_file / size:.0f}%)"
    )


def _table(stats: dict[tuple, Stats], workload: str) -> list[str]:
    cells = {k: v for k, v in stats.items() if k[0] == workload and k[2] in ("save", "load")}
    if not cells:
        return []
    size = next(iter(cells.values())).bytes
    lines = [
        f"### {TITLES.get(workload, workload)}: {size / GB:.2f} GB",
        "",
        "| operation | cache | median s | GB/s | best s | x ceiling | torchkeep speed-up "
        "| blocked s | peak extra RSS | private / file-mapped peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (_, sz, kind, op, cache), s in sorted(
        cells.items(), key=lambda kv: (kv[0][2] != "save", kv[0][4], kv[0][3])
    ):
        ceil = stats.get((workload, sz, "save", CEILING, ""))
        ref = stats.get((workload, sz, kind, TK_SAVE if kind == "save" else TK_LOAD, cache))
        xceil = f"{ceil.median / s.median:.2f}" if ceil and kind == "save" else "-"
        speed = f"{s.median / ref.median:.2f}" if ref else "-"
        blocked = f"{s.blocked:.3f}" if s.blocked is not None else "-"
        lines.append(
            f"| {op} | {cache or '-'} | {s.median:.3f} | {s.gbps:.2f} | {s.best:.3f} | {xceil} "
            f"| {speed} | {blocked} | {_fmt_peak(s)} | {fmt_split(s)} |"
        )
    lazy = {k: v for k, v in stats.items() if k[0] == workload and k[2] == "lazy"}
    for (_, _, _, op, _), s in sorted(lazy.items()):
        lines.append(f"\nLazy access, {op}: {1000 * s.median:.2f} ms (median)")
    return lines + [""]


def tables(stats: dict[tuple, Stats]) -> str:
    out: list[str] = []
    for workload in ("llm", "optim", "small", "huge"):
        out.extend(_table(stats, workload))
    return "\n".join(out)


def _get(stats: dict, workload: str, kind: str, op: str, cache: str = "") -> Stats | None:
    for (w, _, k, o, c), s in stats.items():
        if (w, k, o, c) == (workload, kind, op, cache):
            return s
    return None


def _check(out: list, label: str, value: float | None, goal: float, higher: bool = True) -> None:
    if value is None:
        out.append(f"- [n/a] {label}: not measured")
        return
    ok = value >= goal if higher else value <= goal
    sign = ">=" if higher else "<="
    out.append(f"- [{'met' if ok else 'MISSED'}] {label}: {value:.2f} (goal {sign} {goal})")


def _ratio(a: Stats | None, b: Stats | None, attr: str = "median") -> float | None:
    return getattr(a, attr) / getattr(b, attr) if a and b else None


def targets(stats: dict[tuple, Stats]) -> str:
    """The issue's targets, each with its measured value."""
    out: list[str] = []
    for w in ("llm", "huge"):
        tk, ceil = _get(stats, w, "save", TK_SAVE), _get(stats, w, "save", CEILING)
        _check(
            out, f"{w}: save speed / device ceiling (best vs best)", _ratio(ceil, tk, "best"), 0.9
        )
        if ceil:
            out.append(f"- [info] {w}: {ceiling_note(ceil)}")
    tk = _get(stats, "llm", "save", TK_SAVE)
    for peer, goal in (("torch.save", 1.3), ("safetensors.save_file", 2.0), ("dcp.save", 1.0)):
        _check(
            out,
            f"llm: save speed-up over {peer}",
            _ratio(_get(stats, "llm", "save", peer), tk),
            goal,
        )
    small_tk = _get(stats, "small", "save", TK_SAVE)
    _check(
        out,
        "small: save speed-up over torch.save",
        _ratio(_get(stats, "small", "save", "torch.save"), small_tk),
        2.0,
    )
    for cache in ("warm", "cold"):
        for mode, goal in (("False", 1.0), ("True", 0.8)):
            mine = _get(stats, "llm", "load", f"torchkeep verify={mode}", cache)
            for peer in ("torch.load mmap=True", "safetensors.load_file"):
                _check(
                    out,
                    f"llm {cache}: load verify={mode} speed vs {peer}",
                    _ratio(_get(stats, "llm", "load", peer, cache), mine),
                    goal,
                )
            if mine and mine.peak is not None:
                _check(
                    out,
                    f"llm {cache}: load verify={mode} peak extra RSS, % of checkpoint",
                    100 * mine.peak / mine.bytes,
                    10.0,
                    higher=False,
                )
    out.extend(memory_notes(stats))
    lazy = _get(stats, "llm", "lazy", "torchkeep.open_file+read_entry")
    _check(out, "llm: lazy open + one tensor, ms", lazy and 1000 * lazy.median, 5.0, higher=False)
    async_ = _get(stats, "llm", "save", "torchkeep.save_async")
    if async_ and async_.blocked is not None and tk:
        _check(
            out,
            "llm: save_async blocked time, % of sync save",
            100 * async_.blocked / tk.median,
            15.0,
            higher=False,
        )
    floor = _get(stats, "llm", "floor", COPY_FLOOR)
    if async_ and async_.blocked is not None and floor and tk:
        out.append(
            f"- [info] llm: a bare memory copy of the same tensors, same processes: "
            f"{1000 * floor.median:.0f} ms = {100 * floor.median / tk.median:.1f} % of sync save "
            f"(save_async blocked {1000 * async_.blocked:.0f} ms = "
            f"{async_.blocked / floor.median:.2f}x that copy)"
        )
    return "\n".join(out)


def ceiling_note(ceil: Stats) -> str:
    """How the ceiling was written: threads, block, whether O_DIRECT held, its best GB/s."""
    row = ceil.rows[0]
    if "threads" not in row:
        return "ceiling row without its settings (an older run)"
    mode = "O_DIRECT" if row.get("direct") else "buffered: O_DIRECT refused, NOT a device limit"
    return (
        f"device ceiling {ceil.bytes / ceil.best / GB:.2f} GB/s best ({row['threads']} threads "
        f"x {row['block'] // MB} MiB blocks, {mode}; chosen from {len(row.get('sweep', []))} "
        "sweep settings)"
    )


def memory_notes(stats: dict[tuple, Stats]) -> list[str]:
    """Each LLM-like load's peak as private (anonymous) / file-mapped memory: a loader that
    maps the file shows page-cache pages as RSS; only the private part is memory it holds."""
    out = []
    for (w, _, kind, op, cache), s in sorted(stats.items(), key=lambda kv: (kv[0][4], kv[0][3])):
        if (w, kind) == ("llm", "load") and s.peak_anon is not None:
            out.append(f"- [info] llm {cache}: {op} peak private / file-mapped: {fmt_split(s)}")
    return out


def plot(stats: dict[tuple, Stats], path: str) -> None:
    """Save and load GB/s against checkpoint size, one line per contender (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind in zip(axes, ("save", "load")):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (w, _, k, op, _), s in stats.items():
            if w == "scale" and k == kind:
                series[op].append((s.bytes / GB, s.gbps))
        for op, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=op)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("checkpoint size (GB)")
        ax.set_ylabel("GB/s")
        ax.set_title(
            f"{kind} ({'fsync included' if kind == 'save' else 'into a live model, warm'})"
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict[str, Any]]) -> str:
    stats = aggregate(rows)
    return tables(stats) + "\n### Targets\n\n" + targets(stats) + "\n"


def load_run(path: str) -> tuple[dict, list[dict]]:
    """(meta, rows) of a results file written by ``run.write_results``."""
    meta: dict = {}
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "meta" in record and "op" not in record:
                meta = record["meta"]
            else:
                rows.append(record)
    return meta, rows


if __name__ == "__main__":
    import sys

    for results_file in sys.argv[1:]:  # rebuild a committed run's tables from its raw rows
        run_meta, run_rows = load_run(results_file)
        print(f"Run `{run_meta.get('run', results_file)}`: `{run_meta.get('command', '?')}`\n")
        print(summary(run_rows))
