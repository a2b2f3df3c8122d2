"""Peak memory of an operation split into private (anonymous) pages and mapped file pages.

``VmHWM`` counts every resident page, so a loader that maps the file (``torch.load(mmap=True)``,
``safetensors.load_file``) shows the checkpoint's size as "extra RSS" although those pages are
the page cache, shared and reclaimable, not memory the load allocated. Comparing like with like
needs the two apart: ``/proc/self/smaps_rollup`` gives ``Rss`` and ``Anonymous``; anonymous
pages are the process's private memory (heap, tensors it allocated), ``Rss - Anonymous`` the
file-backed pages it has mapped. A sampler thread reads both every ``interval`` seconds while
the operation runs (and once more at its end) and keeps each one's maximum above its start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

ROLLUP = "/proc/self/smaps_rollup"


def parse_rollup(text: str) -> dict[str, int]:
    """The ``Name: N kB`` fields of an smaps_rollup text, in bytes."""
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) * 1024
    return fields


def split(fields: dict[str, int]) -> tuple[int, int]:
    """(anonymous bytes, file-backed resident bytes) of one rollup."""
    anon = fields.get("Anonymous", 0)
    return anon, max(0, fields.get("Rss", 0) - anon)


def read_split(path: str = ROLLUP) -> tuple[int, int] | None:
    """This process's (anonymous, file-backed) resident bytes; None where smaps_rollup is absent."""
    try:
        with open(path) as f:
            return split(parse_rollup(f.read()))
    except OSError:
        return None


class PeakSampler:
    """Track the maxima of anonymous and file-backed RSS above their values at ``start``."""

    def __init__(self, interval: float = 0.002, reader: Callable[[], Any] = read_split) -> None:
        self.interval = interval
        self.reader = reader
        self.base: tuple[int, int] | None = None
        self.peak = [0, 0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Take one sample now (also called by contenders just before a load frees its result)."""
        now = self.reader()
        if now is None or self.base is None:
            return
        for i in (0, 1):
            self.peak[i] = max(self.peak[i], now[i] - self.base[i])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakSampler:
        self.base = self.reader()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()  # the end state, in case the op was shorter than one interval
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, int | None]:
        """``peak_anon`` and ``peak_file`` in bytes (None without smaps_rollup)."""
        if self.base is None:
            return {"peak_anon": None, "peak_file": None}
        return {"peak_anon": self.peak[0], "peak_file": self.peak[1]}


def peak_split(
    fn: Callable[..., Any], *args: Any, hooks: list | None = None, interval: float = 0.002
) -> dict:
    """Run ``fn(*args)`` (untimed) and return its ``peak_anon``/``peak_file`` bytes.

    ``hooks``: a list the operation calls just before it frees its result (contenders'
    ``RELEASE_HOOKS``); the sampler adds itself there for the call, so the moment when a load's
    whole result is alive is always sampled, however short the load.
    """
    sampler = PeakSampler(interval)
    if hooks is not None:
        hooks.append(sampler.sample)
    try:
        with sampler:
            fn(*args)
    finally:
        if hooks is not None:
            hooks.remove(sampler.sample)
    return sampler.result()
