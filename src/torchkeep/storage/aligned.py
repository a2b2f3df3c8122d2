"""Page-aligned staging buffers for direct I/O, kept and reused across saves.

Direct I/O needs the buffer address, file offset and length aligned to the device's block
size. Tensor memory is rarely page-aligned at the right phase, so the bytes are copied into
these buffers first (one memcpy, cheaper than the page-cache copy it replaces). Reusing them
means their pages are faulted in once per process, not once per save.
"""

from __future__ import annotations

import ctypes
import mmap
import threading


class AlignedBuffer:
    """``size`` bytes of anonymous, page-aligned memory (or borrowed aligned memory) with its
    address."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._map: mmap.mmap | None = mmap.mmap(-1, size)
        self.view = memoryview(self._map)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    @classmethod
    def borrow(cls, view: memoryview, address: int, alignment: int) -> AlignedBuffer:
        """Wrap memory aligned to ``alignment`` that someone else owns and keeps alive (an
        async snapshot). Direct I/O needs block alignment, not page alignment."""
        if address % alignment:
            raise ValueError(f"memory at {address:#x} is not aligned to {alignment} bytes")
        buffer = cls.__new__(cls)
        buffer.size, buffer._map, buffer.view, buffer.address = view.nbytes, None, view, address
        return buffer

    def copy_in(self, at: int, source_address: int, nbytes: int) -> None:
        """Copy ``nbytes`` from memory at ``source_address`` to ``at`` (releases the GIL)."""
        self._check(at, nbytes)
        ctypes.memmove(self.address + at, source_address, nbytes)

    def zero(self, at: int, nbytes: int) -> None:
        self._check(at, nbytes)
        ctypes.memset(self.address + at, 0, nbytes)

    def _check(self, at: int, nbytes: int) -> None:
        """Raw memory copies get no bounds check from Python: refuse any that would overrun."""
        if at < 0 or nbytes < 0 or at + nbytes > self.size:
            raise ValueError(f"{nbytes} bytes at {at} do not fit a {self.size}-byte buffer")


class BufferPool:
    """Hands out buffers of one size; keeps up to ``keep`` returned ones for the next save."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[AlignedBuffer] = []

    def take(self, size: int) -> AlignedBuffer:
        with self._lock:
            while self._free:
                buffer = self._free.pop()
                if buffer.size == size:
                    return buffer
        return AlignedBuffer(size)

    def give(self, buffer: AlignedBuffer, keep: int) -> None:
        with self._lock:
            if len(self._free) < keep:
                self._free.append(buffer)


#: The process's direct-I/O staging buffers.
STAGING = BufferPool()


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment
