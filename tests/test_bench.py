"""The benchmark's measuring rules: side-by-side warm loads (every family's load ops timed in
one process; a warm cell's seconds from those rows, its peak RSS from the family's own
process), async saves timed over several steady-state saves per process, the device ceiling
(O_DIRECT threads, settings from a sweep), peak memory split into private and file-mapped
pages, and each run's raw rows kept as JSONL under benchmarks/results/."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import ceiling  # noqa: E402
import contenders  # noqa: E402
import memsplit  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
from report import aggregate  # noqa: E402

MB = 1 << 20


def _row(op: str, seconds: float, peak: int | None, side: bool = False) -> dict:
    row = {"workload": "llm", "size": 0, "kind": "load", "op": op, "cache": "warm"}
    row.update(bytes=1000, seconds=seconds, peak_extra=peak)
    if side:
        row["side_by_side"] = True
    return row


def test_warm_cell_takes_seconds_from_side_by_side_rows_and_rss_from_own_process() -> None:
    rows = [_row("x", 9.0, 500), _row("x", 8.0, 700)]  # own process: slow episode, RSS
    rows += [_row("x", s, None, side=True) for s in (1.0, 2.0, 3.0)]
    stats = aggregate(rows)[("llm", 0, "load", "x", "warm")]
    assert stats.median == 2.0 and stats.best == 1.0 and stats.n == 3
    assert stats.peak == 600


def test_cell_without_side_by_side_rows_uses_all_rows() -> None:
    stats = aggregate([_row("x", 1.0, 10), _row("x", 3.0, 30)])[("llm", 0, "load", "x", "warm")]
    assert stats.median == 2.0 and stats.peak == 20


def test_side_by_side_worker_times_every_family_load_in_rotated_rounds(tmp_path) -> None:
    families = ["torchkeep", "torch", "safetensors"]
    job = {"workload": "huge", "size": 1 << 20, "family": "side-by-side", "dir": str(tmp_path)}
    job.update(load_families=families, rounds=2, rep=1)
    cmd = [sys.executable, os.path.join(BENCH, "worker.py"), json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ops = [r["op"] for r in rows]
    expected = {
        "torchkeep verify=False",
        "torchkeep verify=True",
        "torch.load",
        "torch.load mmap=True",
        "safetensors.load_file",
    }
    assert set(ops) == expected and len(ops) == 2 * len(expected)
    assert ops[: len(expected)] != ops[len(expected) :]  # the order turns between rounds
    for r in rows:
        assert r["side_by_side"] and r["peak_extra"] is None
        assert r["cache"] == "warm" and r["kind"] == "load" and r["seconds"] > 0
    assert os.listdir(tmp_path) == []  # its files are removed


def _async_row(blocked: float, samples: list[float] | None) -> dict:
    row = {"workload": "llm", "size": 0, "kind": "save", "op": "a", "cache": ""}
    row.update(bytes=1000, seconds=1.0, peak_extra=None, blocked=blocked)
    if samples is not None:
        row["blocked_samples"] = samples
    return row


def test_blocked_cell_is_the_median_of_every_save_of_every_process() -> None:
    rows = [_async_row(0.2, [0.1, 0.2, 0.9]), _async_row(0.5, [0.4, 0.5, 0.6])]
    rows.append(_async_row(0.7, None))  # a row from before the samples were kept
    stats = aggregate(rows)[("llm", 0, "save", "a", "")]
    assert stats.blocked == 0.5  # median of 0.1 0.2 0.4 0.5 0.6 0.7 0.9; of the rows: 0.5 too
    rows[1]["blocked_samples"] = [0.05, 0.06, 0.07]
    assert aggregate(rows)[("llm", 0, "save", "a", "")].blocked == 0.1


def test_async_saves_are_timed_after_a_warm_up_each_to_a_new_path(tmp_path) -> None:
    path = str(tmp_path / "ck")
    started: list[tuple[str, bool]] = []

    def start(p: str):
        started.append((p, os.path.exists(p)))
        open(p, "w").close()
        return lambda: time.sleep(0.01)  # the background write: not blocked time

    result = contenders.time_async_saves(start, path)
    n = contenders.ASYNC_SAMPLES
    assert started == [(path + ".warmup", False)] + [(path, False)] * n
    assert not os.path.exists(path + ".warmup")
    assert len(result["blocked_samples"]) == n
    assert result["blocked"] == statistics.median(result["blocked_samples"])
    assert result["seconds"] >= 0.01 > max(result["blocked_samples"])


def test_worker_reports_every_timed_async_save_and_the_copy_floor(tmp_path) -> None:
    job = {"workload": "huge", "size": 1 << 20, "family": "torchkeep", "dir": str(tmp_path)}
    job.update(ops=["torchkeep.save_async"], caches=[], rep=0)
    cmd = [sys.executable, os.path.join(BENCH, "worker.py"), json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["op"]: r for r in map(json.loads, proc.stdout.splitlines())}
    saved = rows["torchkeep.save_async"]
    assert len(saved["blocked_samples"]) == contenders.ASYNC_SAMPLES
    assert 0 < saved["blocked"] <= saved["seconds"]
    assert rows["bare memory copy (Tensor.copy_)"]["kind"] == "floor"


# -- the device ceiling ----------------------------------------------------------------------


def _blocks_written(path: str, size: int, block: int) -> list[bool]:
    """For each ``block`` of the file: does it hold data (not the preallocated zeros)?"""
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) == size
    return [any(data[i : i + block]) for i in range(0, size, block)]


@pytest.mark.parametrize("direct_refused", [False, True])
def test_ceiling_threads_write_every_aligned_block(tmp_path, monkeypatch, direct_refused) -> None:
    if direct_refused:  # tmpfs and some overlays refuse O_DIRECT: buffered, and said so
        real_open = os.open

        def refuse_direct(path, flags, mode=0o777):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(22, "Invalid argument")
            return real_open(path, flags, mode)

        monkeypatch.setattr(ceiling.os, "open", refuse_direct)
    path = str(tmp_path / "c.bin")
    nbytes = 3 * MB + 5  # not a multiple of the block: the tail block is short, still aligned
    result = ceiling.write_ceiling(path, nbytes, threads=3, block=MB)
    size = 3 * MB + 4096
    assert result["bytes"] == size and os.path.getsize(path) == size
    assert result["threads"] == 3 and result["block"] == MB and result["seconds"] > 0
    assert all(_blocks_written(path, size, 4096))  # every 4 KiB page came from a thread
    if direct_refused:
        assert result["direct"] is False
    else:
        assert result["direct"] is ceiling._open(str(tmp_path / "probe"))[1]
    with pytest.raises(ValueError):
        ceiling.write_ceiling(path, MB, threads=2, block=1000)  # not 4 KiB aligned


def test_sweep_tries_each_setting_and_best_wins(tmp_path) -> None:
    path = str(tmp_path / "s.bin")
    results = ceiling.sweep(path, 2 * MB, threads=(1, 2, 8), blocks=(MB, 2 * MB))
    pairs = {(r["threads"], r["block"]) for r in results}
    # 8 threads of 1-2 MiB blocks on a 2 MiB probe: more threads than blocks, skipped
    assert pairs == {(1, MB), (2, MB), (1, 2 * MB), (2, 2 * MB)}
    assert all(r["gbps"] > 0 for r in results) and not os.path.exists(path)
    fake = [{"threads": 1, "block": MB, "gbps": 1.0}, {"threads": 4, "block": 4 * MB, "gbps": 3.0}]
    fake.append({"threads": 8, "block": MB, "gbps": 2.0})
    assert ceiling.best_setting(fake) == (4, 4 * MB)


def test_device_ceiling_sweeps_once_and_times_only_the_final_write(tmp_path, monkeypatch) -> None:
    calls = []
    real_sweep = ceiling.sweep

    def slow_sweep(*args, **kwargs):
        calls.append(args)
        time.sleep(0.3)  # must not show in the row's seconds
        return real_sweep(*args, **kwargs)

    monkeypatch.setattr(ceiling, "sweep", slow_sweep)
    setting = str(tmp_path / "setting.json")
    grid = {"threads": (1, 2), "blocks": (MB,)}
    first = ceiling.device_ceiling(str(tmp_path / "a.bin"), 2 * MB, setting_file=setting, **grid)
    second = ceiling.device_ceiling(str(tmp_path / "b.bin"), 4 * MB, setting_file=setting, **grid)
    assert len(calls) == 1  # the second row reused the first row's sweep
    assert first["seconds"] < 0.3 and second["seconds"] < 0.3
    assert (first["threads"], first["block"]) == (second["threads"], second["block"])
    assert len(first["sweep"]) == 2 and first["sweep"] == second["sweep"]
    assert os.path.getsize(tmp_path / "b.bin") == 4 * MB


# -- peak memory: private (anonymous) against file-mapped -------------------------------------

ROLLUP = """55d0c0a00000-7ffd1b3f2000 ---p 00000000 00:00 0                          [rollup]
Rss:              300000 kB
Pss:              290000 kB
Private_Clean:    150000 kB
Private_Dirty:    100000 kB
Anonymous:        100000 kB
Swap:                  0 kB
"""


def test_rollup_parse_and_split() -> None:
    fields = memsplit.parse_rollup(ROLLUP)
    assert fields["Rss"] == 300000 * 1024 and fields["Anonymous"] == 100000 * 1024
    assert memsplit.split(fields) == (100000 * 1024, 200000 * 1024)
    assert memsplit.split({"Rss": 5}) == (0, 5)


def test_sampler_keeps_each_kinds_peak_and_samples_at_the_release_hook() -> None:
    readings = iter([(100, 1000), (400, 1000), (150, 9000), (100, 1000)])
    hooks: list = []
    seen = []

    def op() -> None:
        for hook in hooks:
            hook()  # as a load does just before freeing its result
            seen.append(True)

    sampler = memsplit.PeakSampler(interval=60.0, reader=lambda: next(readings))
    hooks.append(sampler.sample)
    with sampler:  # base (100, 1000); the interval is too long for the thread to sample
        op()  # hook: (400, 1000)
    # __exit__ samples (150, 9000); anon peaked at the hook, file-mapped at the end
    assert seen and sampler.result() == {"peak_anon": 300, "peak_file": 8000}


def test_peak_split_tells_mapped_file_pages_from_private_memory(tmp_path) -> None:
    if memsplit.read_split() is None:
        pytest.skip("no /proc/self/smaps_rollup")
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 16) * 512)  # 32 MiB, in the page cache
    hooks: list = []

    def map_file() -> None:
        import mmap

        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            sum(m[i] for i in range(0, len(m), 4096))  # touch every page
            for hook in hooks:
                hook()

    def allocate() -> None:
        buffer = bytearray(32 * MB)
        buffer[::4096] = b"\1" * len(buffer[::4096])
        for hook in hooks:
            hook()
        del buffer

    mapped = memsplit.peak_split(map_file, hooks=hooks)
    private = memsplit.peak_split(allocate, hooks=hooks)
    assert hooks == []  # the sampler took itself out again
    assert mapped["peak_file"] >= 24 * MB and mapped["peak_anon"] < 8 * MB, mapped
    assert private["peak_anon"] >= 24 * MB and private["peak_file"] < 8 * MB, private


def test_report_shows_the_split_and_the_ceiling_settings() -> None:
    def load_row(anon: int, file: int) -> dict:
        row = _row("torch.load mmap=True", 1.0, 1000)
        row.update(peak_anon=anon, peak_file=file)
        return row

    stats = aggregate([load_row(10, 900), load_row(30, 1000), load_row(20, 950)])
    cell = stats[("llm", 0, "load", "torch.load mmap=True", "warm")]
    assert (cell.peak, cell.peak_anon, cell.peak_file) == (1000, 20, 950)
    assert report.fmt_split(cell) == "0 MB (2%) / 0 MB (95%)"
    notes = report.memory_notes(stats)
    assert notes == ["- [info] llm warm: torch.load mmap=True peak private / file-mapped: "
                     "0 MB (2%) / 0 MB (95%)"]  # fmt: skip
    assert "private / file-mapped peak" in report.tables(stats)
    assert report.fmt_split(aggregate([_row("x", 1.0, 5)])[("llm", 0, "load", "x", "warm")]) == "-"
    ceil = {"workload": "llm", "size": 0, "kind": "save", "op": report.DEVICE_CEILING, "cache": ""}
    ceil.update(bytes=2 * 10**9, seconds=1.0, peak_extra=None, threads=4, block=4 * MB)
    ceil.update(direct=True, sweep=[{}] * 12)
    tk = {**ceil, "op": report.TK_SAVE, "seconds": 2.0}
    for key in ("threads", "block", "direct", "sweep"):
        tk.pop(key)
    text = report.targets(aggregate([ceil, tk]))
    assert "llm: save speed / device ceiling (best vs best): 0.50" in text
    assert "2.00 GB/s best (4 threads x 4 MiB blocks, O_DIRECT; chosen from 12" in text
    ceil["direct"] = False
    assert "NOT a device limit" in report.targets(aggregate([ceil, tk]))


def test_worker_rows_carry_the_memory_split_and_the_ceiling_settings(tmp_path) -> None:
    def worker(family: str, **extra) -> dict:
        job = {"workload": "huge", "size": 8 * MB, "family": family, "dir": str(tmp_path)}
        job.update(caches=["warm"], rep=0, **extra)
        cmd = [sys.executable, os.path.join(BENCH, "worker.py"), json.dumps(job)]
        # A fixed malloc mmap threshold: glibc's dynamic one rises after the first 8 MiB free
        # and then serves the next load from heap pages still resident (no new RSS to see);
        # the real benchmark's 1 GB tensors are far above its 32 MiB maximum anyway.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return {r["op"]: r for r in map(json.loads, proc.stdout.splitlines())}

    rows = worker("torch")
    mapped, read = rows["torch.load mmap=True"], rows["torch.load"]
    assert mapped["peak_file"] >= 4 * MB > mapped["peak_anon"], mapped  # page cache, not its own
    assert read["peak_anon"] >= 4 * MB, read  # torch.load reads into private memory
    rows = worker("ceiling", ops=[report.DEVICE_CEILING])
    row = rows[report.DEVICE_CEILING]
    assert row["threads"] in ceiling.THREADS and row["block"] in ceiling.BLOCKS
    assert isinstance(row["direct"], bool) and len(row["sweep"]) >= 3 and row["seconds"] > 0


# -- raw rows of every run ------------------------------------------------------------------


def test_results_are_written_per_run_id_and_read_back(tmp_path) -> None:
    rows = [_row("x", 1.0, 10), _row("x", 3.0, 30)]
    meta = {"run": "AG", "command": "python benchmarks/run.py", "machine": "m"}
    path = run.write_results(str(tmp_path / "results"), "AG", meta, rows)
    assert path == str(tmp_path / "results" / "AG.jsonl")
    got_meta, got_rows = report.load_run(path)
    assert got_meta == meta and [r.pop("run") for r in got_rows] == ["AG", "AG"]
    assert got_rows == rows
    with pytest.raises(FileExistsError):
        run.write_results(str(tmp_path / "results"), "AG", meta, rows)  # never overwritten
    for bad in ("", "../x", ".hidden"):
        with pytest.raises(ValueError):
            run.write_results(str(tmp_path / "results"), bad, meta, rows)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
