"""Every tuning constant of torchkeep in one place.

Each can be overridden by an environment variable ``TORCHKEEP_<NAME>`` (read at import).
"""

from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(f"TORCHKEEP_{name}")
    return int(raw) if raw else default


#: Largest JSON header accepted when reading (safetensors uses the same 100 MB cap).
MAX_HEADER_BYTES = _env_int("MAX_HEADER_BYTES", 100_000_000)
#: Deepest nesting accepted in the typed tree of non-tensor values.
MAX_TREE_DEPTH = _env_int("MAX_TREE_DEPTH", 200)
#: Largest tensor rank accepted when reading.
MAX_RANK = _env_int("MAX_RANK", 64)
#: Bytes per write/hash chunk: large enough for disk bandwidth, small enough to overlap work.
CHUNK_BYTES = _env_int("CHUNK_BYTES", 64 * 1024 * 1024)
#: Threads that write and hash tensor data concurrently (I/O and xxhash release the GIL).
IO_THREADS = _env_int("IO_THREADS", 4)
#: Tensors up to this size are gathered into a batch written with one ``pwritev`` straight
#: from their memory (per-tensor cost: one hash instead of a syscall and a thread hand-off).
SMALL_TENSOR_BYTES = _env_int("SMALL_TENSOR_BYTES", 256 * 1024)
#: Verified loads read in pieces of this size and hash each piece while it is still in the CPU
#: cache, instead of reading a whole batch and hashing it again from memory.
READ_PIECE_BYTES = _env_int("READ_PIECE_BYTES", 1024 * 1024)
#: Piece size in which a load reads an entry larger than ``CHUNK_BYTES`` (and a lone tensor
#: read on its own), the pieces shared out among the I/O threads in file order. Small pieces
#: keep the threads reading next to each other, one sequential stream to the disk: a cold
#: 1.07 GB tensor loaded in 0.347 s in 4 MiB pieces against 0.420 s in 64 MiB pieces (fresh
#: processes, medians of 10; in an earlier try 8 MiB 0.33-0.44 s, 16 MiB 0.41-0.64 s), and warm
#: loads were alike (in one process, medians of 21: 63.5 against 59.8 ms unverified, 86.9
#: against 90.1 ms verified).
READ_CHUNK_BYTES = _env_int("READ_CHUNK_BYTES", 4 * 1024 * 1024)
#: Size of one staging batch of small tensors (also the read batch of small tensors on load).
BATCH_BYTES = _env_int("BATCH_BYTES", 8 * 1024 * 1024)
#: The verification pass before a load (``transfer/hashing.py``) hashes a mapped file in pieces
#: of this size and unmaps each piece's pages once hashed, so the process's RSS grows by about
#: (IO_THREADS + 1) pieces, not by the file (4 MiB: +30 MB and 14 % slower than keeping the
#: whole 1.27 GB file mapped; 8 MiB: +40 MB, 7-9 %; measured on the LLM-like file, 2 vCPUs).
VERIFY_MAP_PIECE_BYTES = _env_int("VERIFY_MAP_PIECE_BYTES", 8 * 1024 * 1024)
#: Piece size in which an async save's snapshot copy of large CPU tensors is shared out among
#: the I/O threads and the caller. Under CPU contention (a 50 % busy-loop on a 2-vCPU VM) a
#: 1.28 GB snapshot took 64-65 ms in 4 MiB pieces against 79-81 ms with ``Tensor.copy_``
#: (2 MiB 67 ms, 8 MiB 70 ms); on an idle machine the two tie.
SNAPSHOT_PIECE_BYTES = _env_int("SNAPSHOT_PIECE_BYTES", 4 * 1024 * 1024)
#: Make the async snapshot's large copies with streaming (non-temporal) stores, which skip
#: reading each destination line before writing it (x86-64, where the optional C extension is
#: built; ``memcopy.py``). A 1.28 GB snapshot on two threads: 53-55 ms against 76-80 ms with
#: ``np.copyto``. 0 copies with numpy.
STREAMING_COPY = _env_int("STREAMING_COPY", 1)
#: An overlapped snapshot hashes each piece of this size right after copying it, while the
#: source is still cached, so its checksum costs no second read from memory and the background
#: write has no hashing left to do (``memcopy.copy_and_hash``).
SNAPSHOT_HASH_PIECE_BYTES = _env_int("SNAPSHOT_HASH_PIECE_BYTES", 1024 * 1024)
#: Start each written chunk's writeback right away (Linux sync_file_range), so the disk works
#: while later chunks are copied and the closing fsync has little left to do. 0 disables.
EARLY_WRITEBACK = _env_int("EARLY_WRITEBACK", 1)
#: Write large files with direct I/O (O_DIRECT, Linux): the bytes go from a few reused aligned
#: staging buffers straight to the disk instead of through the page cache. A save then neither
#: fills (and, on VMs, faults in) a page-cache page per 4 KiB nor evicts the training data's
#: cached pages; filesystems without direct I/O fall back to buffered writes. 0 disables.
DIRECT_IO = _env_int("DIRECT_IO", 1)
#: Files with less tensor data than this are written buffered (small saves gain nothing, and
#: a save that is loaded right back still finds its pages cached).
DIRECT_MIN_BYTES = _env_int("DIRECT_MIN_BYTES", 32 * 1024 * 1024)
#: Size of one direct-I/O write (and staging buffer; ``IO_THREADS`` of them are kept for
#: reuse). 1 MiB was as fast as or faster than 2-8 MiB in every comparison made
#: (``python benchmarks/first_save.py``: 0.38-0.44 s for 1.28 GB, 8 MiB 0.41-0.50 s), with
#: the least staging memory.
DIRECT_CHUNK_BYTES = _env_int("DIRECT_CHUNK_BYTES", 1024 * 1024)
#: Size of one direct-I/O write from an async snapshot's image (no staging buffer involved, so
#: larger costs no memory): fewer system calls, thread hand-offs and (on VMs) device
#: notifications. 40 overlapped saves of the training benchmark's 198 MB state in a row, no
#: training: CPU time per save 95 ms at 1 MiB, 79 ms at 8 MiB, 76 ms at 32 MiB.
DIRECT_IMAGE_CHUNK_BYTES = _env_int("DIRECT_IMAGE_CHUNK_BYTES", 8 * 1024 * 1024)
#: Alignment of direct-I/O offsets, lengths and buffers: 4096 covers 512-byte and 4K-sector
#: devices alike.
DIRECT_ALIGN = _env_int("DIRECT_ALIGN", 4096)
#: Header is padded to a multiple of this many bytes so tensor data starts aligned.
HEADER_ALIGN = _env_int("HEADER_ALIGN", 64)
#: Most elements a saved view may expose. Views are lazy, but a hostile stride-0 view of 2**62
#: elements would make any later pass over it (diff, convert, clone) run for ever.
MAX_VIEW_ELEMENTS = _env_int("MAX_VIEW_ELEMENTS", 2**32)
#: Largest single pickle stream the static pickle scan reads (``torchkeep scan``, and the check
#: before any untrusted ``torch.load``). The stream is read through a capped reader, so a
#: deflated 1 GiB member of a 3 MB zip costs at most this much decompression, never an
#: allocation of its claimed size; a longer pickle is reported unsafe ("over the cap"). The
#: scan replays about 1 MB of pickle a second, so this also bounds its time (about a minute).
#: A compressed archive nested in an archive is spooled, and is accepted up to this size too
#: (torch writes nested archives uncompressed; those are read in place).
SCAN_MAX_PICKLE_BYTES = _env_int("SCAN_MAX_PICKLE_BYTES", 64 * 1024 * 1024)
#: Most stack, mark and memo entries the scan's simulated unpickler holds for one pickle (the
#: scan's memory is proportional to this, about 100 bytes an entry).
SCAN_MAX_PICKLE_OBJECTS = _env_int("SCAN_MAX_PICKLE_OBJECTS", 4_000_000)
#: Most bytes the scan decompresses for one file in all (every pickle of every nested archive
#: together, and every compressed nested archive it spools).
SCAN_MAX_TOTAL_BYTES = _env_int("SCAN_MAX_TOTAL_BYTES", 1024 * 1024 * 1024)
#: Most members the scan accepts in one zip or tar archive (nested archives count apiece).
SCAN_MAX_MEMBERS = _env_int("SCAN_MAX_MEMBERS", 1_000_000)
#: Deepest nesting of archives inside archives the scan follows (a torch.export archive holds
#: torch.save zips: depth 2); deeper nesting is reported unsafe.
SCAN_MAX_DEPTH = _env_int("SCAN_MAX_DEPTH", 4)
#: Resource limits on what a file may claim (docs/guarantees.md, "Resource limits"). The
#: tensors a file exposes (views and aliases counted at their full logical size) may total at
#: most ``MAX_EXPANSION`` times the file's real size plus ``EXPANSION_FLOOR_BYTES``: a tiny file
#: cannot make ``diff``, ``convert`` or a caller's pass over its tensors allocate or loop over
#: gigabytes through stride-0 (expanded) views. Raise them for a trusted file that needs more.
MAX_EXPANSION = _env_int("MAX_EXPANSION", 64)
EXPANSION_FLOOR_BYTES = _env_int("EXPANSION_FLOOR_BYTES", 256 * 1024 * 1024)
#: Most keys of one dict or set in the typed tree that may share one hash value (equal
#: hashes make building the dict quadratic; ints and tuples of ints have predictable hashes).
MAX_HASH_COLLISIONS = _env_int("MAX_HASH_COLLISIONS", 64)
#: Object stores (fsspec URLs): size of one multipart-upload part and of one ranged read.
#: S3 needs parts of at least 5 MiB (all but the last).
REMOTE_PART_BYTES = _env_int("REMOTE_PART_BYTES", 16 * 1024 * 1024)
#: Object stores: the buffer pool that bounds the extra memory of a save or load (parts being
#: uploaded, ranges being downloaded), whatever the checkpoint size. At most 256 MB by default.
REMOTE_BUFFER_BYTES = _env_int("REMOTE_BUFFER_BYTES", 128 * 1024 * 1024)
#: Object stores: size of one ranged read (GET) of a load. Each request has a fixed cost (a
#: round trip; on moto a copy of the object), so reads are larger than on a local disk:
#: 128 MB in 4 MiB ranges took 5.8 s from moto, in 16 MiB 1.6 s, in 64 MiB 1.0 s.
REMOTE_READ_BYTES = _env_int("REMOTE_READ_BYTES", 32 * 1024 * 1024)
#: Object stores: how many times a transient failure (network, throttling, 5xx) is retried,
#: with exponential backoff starting at ``REMOTE_BACKOFF_MS`` (doubling, capped at 8 s).
REMOTE_RETRIES = _env_int("REMOTE_RETRIES", 4)
REMOTE_BACKOFF_MS = _env_int("REMOTE_BACKOFF_MS", 200)
#: Seconds a collective of torchkeep.distributed's save/load may wait for the other ranks
#: before failing (a dead or hung rank then makes every other rank raise instead of hanging).
DIST_TIMEOUT_S = _env_int("DIST_TIMEOUT_S", 600)
