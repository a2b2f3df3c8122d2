"""``make fuzz``: a timed fuzzing campaign against torchkeep's file parser and tree decoder.

Uses atheris (coverage-guided libFuzzer) when it is installed, otherwise a seeded random
mutation campaign. Each input is, by its first byte, a whole file, a JSON header after a valid
length prefix, or a typed tree inside a file with valid checksums (so it reaches the decoder).
The only allowed outcomes are a load or a TorchkeepError; any other exception is a crash, and
the input is written to tests/hostile/corpus/ as a regression file (replayed by
tests/hostile/test_resource_bounds.py in a guarded process), then reported.

``--target scan`` fuzzes the static pickle scanner instead: random mutations of real pickles
(torch state dicts of every protocol, the hostile payloads) must never escape the scanner as a
raw exception, and must never call anything (an audit hook aborts on os.system, exec,
subprocess and spawn while the scanner runs).

Usage: ``python tests/fuzz_campaign.py --seconds 300 [--engine atheris|random] [--target scan]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "hostile", "corpus")
sys.path.insert(0, os.path.join(HERE, "hostile"))
SCRATCH = os.path.join(tempfile.mkdtemp(prefix="tk-fuzz-"), "input.tk")
TOKENS = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"-1", b"1e999", b"null", b'"$"', b'"key"',
          b'"view"', b"18446744073709551616"]  # fmt: skip
TENSORS = {"t": ("F32", [4], bytes(range(16))), "u": ("U8", [3], b"abc")}


def build(data: bytes) -> bytes:
    """Turn a fuzz input into file bytes according to its first byte."""
    from forge import raw_file, torchkeep_file

    if not data:
        return data
    mode, body = data[0] % 3, data[1:]
    if mode == 0:
        return body
    if mode == 1:
        return raw_file(body, b"\0" * 16)
    return torchkeep_file(body.decode("utf-8", "replace"), TENSORS)


def exercise(blob: bytes) -> None:
    """Load ``blob`` every way; raises only if something other than TorchkeepError escapes."""
    import torchkeep

    with open(SCRATCH, "wb") as handle:
        handle.write(blob)
    try:
        torchkeep.load(SCRATCH)
        with torchkeep.open_file(SCRATCH) as reader:
            for key in reader.keys():  # noqa: SIM118 - FileReader is not iterable
                reader.read_entry(key)
        torchkeep.load_state_dict(torch.nn.Linear(2, 2), SCRATCH, strict=False)
    except torchkeep.TorchkeepError:
        pass


def keep_crash(data: bytes, exc: BaseException) -> str:
    """Write the crashing file into the regression corpus; returns its path."""
    os.makedirs(CORPUS, exist_ok=True)
    blob = build(data)
    path = os.path.join(CORPUS, f"crash-{hashlib.sha1(blob).hexdigest()[:16]}.bin")
    with open(path, "wb") as handle:
        handle.write(blob)
    print(f"CRASH {type(exc).__name__}: {exc} -> {path}", file=sys.stderr)
    return path


def one_input(data: bytes) -> None:
    try:
        exercise(build(data))
    except Exception as exc:  # noqa: BLE001 - a crash: kept, then re-raised for the engine
        keep_crash(data, exc)
        raise


def seeds() -> list[bytes]:
    """Valid inputs in each mode, from real saves."""
    import json

    import torchkeep
    from torchkeep.transfer.reader import FileReader

    path = SCRATCH + ".seed"
    torchkeep.save({"w": torch.randn(3, 2), "step": 4, "t": (1.5, b"x", {"a": [None]})}, path)
    with open(path, "rb") as handle:
        blob = handle.read()
    with FileReader(path) as reader:
        tree = reader.header.metadata["torchkeep.tree"]
    header = blob[8 : 8 + int.from_bytes(blob[:8], "little")]
    return [b"\0" + blob, b"\1" + header, b"\2" + tree.encode(), b"\2" + json.dumps([1]).encode()]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        at = rng.randrange(len(out) + 1) if out else 0
        if op == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at:at] = bytes([rng.randrange(256)])
        elif op == 2:
            del out[at : at + rng.randint(1, 32)]
        elif op == 3:
            out[at:at] = rng.choice(TOKENS)
        elif op == 4:
            other = rng.choice(pool)
            lo = rng.randrange(len(other) + 1)
            out[at:at] = other[lo : lo + rng.randint(1, 64)]
        elif out:
            out[0] = rng.randrange(256)
    return bytes(out[:100_000])


def random_campaign(seconds: float, seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    pool = seeds()
    runs = crashes = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = mutate(rng, rng.choice(pool), pool)
        runs += 1
        try:
            one_input(data)
        except Exception:  # noqa: BLE001 - kept by one_input
            crashes += 1
            traceback.print_exc()
            continue
        if rng.random() < 0.01 and len(pool) < 500:
            pool.append(data)
    return runs, crashes


def scan_campaign(seconds: float, seed: int) -> int:
    """Mutated real pickles through the scanner for ``seconds``; returns the exit status."""
    from test_scanner import _CALLED, fuzz_scanner

    deadline = time.monotonic() + seconds
    runs = crashes = 0
    while time.monotonic() < deadline:
        try:
            runs += fuzz_scanner(200, seed + runs)
        except Exception:  # noqa: BLE001 - an escaped exception is the finding
            crashes += 1
            traceback.print_exc()
            runs += 200
    print(f"scanner campaign: {runs} inputs, {crashes} crashes, calls {_CALLED}", file=sys.stderr)
    return 1 if crashes or _CALLED else 0


def atheris_campaign(seconds: float) -> None:
    import atheris

    with atheris.instrument_imports(include=["torchkeep"]):
        import torchkeep  # noqa: F401

    seed_dir = tempfile.mkdtemp(prefix="tk-fuzz-seeds-")
    for i, data in enumerate(seeds()):
        with open(os.path.join(seed_dir, f"seed{i}"), "wb") as handle:
            handle.write(data)
    artifacts = tempfile.mkdtemp(prefix="tk-fuzz-artifacts-") + "/"
    args = [sys.argv[0], f"-max_total_time={int(seconds)}", f"-artifact_prefix={artifacts}"]
    atheris.Setup(args + ["-max_len=65536", seed_dir], one_input)
    atheris.Fuzz()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=["file", "scan"], default="file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.target == "scan":
        sys.exit(scan_campaign(args.seconds, args.seed))
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    print(f"fuzzing for {args.seconds:.0f}s with {engine}", file=sys.stderr)
    if engine == "atheris":
        atheris_campaign(args.seconds)  # exits through libFuzzer; non-zero on a crash
        return
    runs, crashes = random_campaign(args.seconds, args.seed)
    print(f"random campaign: {runs} inputs, {crashes} crashes", file=sys.stderr)
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    main()
