"""Load hostile files through every torchkeep entry point in a guarded process.

Usage: ``python guarded_load.py MANIFEST.json`` where the manifest maps case names to paths
(files or run directories) and names a sentinel. After imports and a warm-up on benign files,
the process caps its address space (RLIMIT_AS), installs an audit hook that records and blocks
``os.system``, ``subprocess.Popen``, ``os.exec*``, ``os.posix_spawn``, ``os.fork``, ``exec``
and ``compile``, and bounds every call with SIGALRM. Prints one JSON list of outcomes.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import sysconfig
import traceback

import torch
from click.testing import CliRunner
from torch import nn

import torchkeep
from torchkeep.cli.main import cli
from torchkeep.manager import CheckpointManager
from torchkeep.readers.open import open_view

WATCHED = ("os.system", "subprocess.Popen", "os.posix_spawn", "os.fork", "exec", "compile")
WATCHED_PREFIXES = ("os.exec", "os.spawn", "ctypes.")
TIME_BOUND = 60
MEMORY_HEADROOM = 2 << 30
events: list[str] = []
armed = False


_paths = sysconfig.get_paths()
#: Code compiled from these files is an import of installed code, not a payload; a payload's
#: code comes from a string ("<string>") or a file elsewhere (runpy.run_path on a dropped file).
TRUSTED_CODE = tuple(
    {_paths["stdlib"], _paths["purelib"], _paths["platlib"], os.path.dirname(torchkeep.__file__)}
) + ("<frozen ",)


def _is_import(event: str, args: tuple) -> bool:
    if event == "exec":
        filename = getattr(args[0], "co_filename", "") if args else ""
    elif event == "compile":
        filename = args[1] if len(args) > 1 else ""
    else:
        return False
    return isinstance(filename, str) and filename.startswith(TRUSTED_CODE)


def hook(event: str, args: tuple) -> None:
    watched = event in WATCHED or event.startswith(WATCHED_PREFIXES)
    if armed and watched and not _is_import(event, args):
        events.append(event)
        raise RuntimeError(f"blocked audit event {event}")


def _model() -> nn.Module:
    return nn.Linear(4, 4)


def file_entry_points(path: str, scratch: str) -> dict:
    """Every library and CLI entry point that reads a single checkpoint file."""
    out = os.path.join(scratch, "out.safetensors")
    cli_cmds = {
        "cli inspect": ["inspect", path],
        "cli inspect --json": ["inspect", path, "--json"],
        "cli verify": ["verify", path],
        "cli diff": ["diff", path, path],
        "cli convert": ["convert", path, out],
        "cli scan": ["scan", path],
    }
    calls = {
        "load": lambda: torchkeep.load(path),
        "load mmap": lambda: torchkeep.load(path, mmap=True),
        "load_state_dict": lambda: torchkeep.load_state_dict(_model(), path),
        "load_checkpoint": lambda: torchkeep.load_checkpoint(path, {"model": _model()}),
        "load_model": lambda: torchkeep.load_model(path),
        "open_view": lambda: open_view(path).materialize(),
        "verify": lambda: torchkeep.verify(path),
        "open_file": lambda: torchkeep.open_file(path).close(),
        "load_exported": lambda: torchkeep.load_exported(path),
    }
    calls.update({name: _cli(args) for name, args in cli_cmds.items()})
    return calls


def run_dir_entry_points(path: str) -> dict:
    """Entry points that read a run directory."""
    return {
        "manager restore": lambda: CheckpointManager(path, rng=False).restore({"model": _model()}),
        "load run dir": lambda: torchkeep.load(path),
        "cli ls": _cli(["ls", path]),
        "cli verify run": _cli(["verify", path]),
        "cli inspect run": _cli(["inspect", path]),
    }


class CliFailed(Exception):
    """A CLI command exited non-zero through the error formatter (a typed refusal)."""


def _cli(args: list[str]):
    def call() -> None:
        result = CliRunner().invoke(cli, args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        if result.exit_code != 0:
            lines = [ln for ln in result.output.splitlines() if ln.strip()]
            if "Traceback" in result.output or not lines:
                raise AssertionError(f"exit {result.exit_code} with a traceback or no message")
            if result.exit_code in (3, 4) and not lines[-1].startswith("error:"):
                raise AssertionError(f"exit {result.exit_code} without a one-line error")
            raise CliFailed(f"exit {result.exit_code}: {lines[-1]}")

    return call


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError("time bound exceeded")


def attempt(call) -> tuple[str, bool, str]:
    global armed
    signal.alarm(TIME_BOUND)
    armed = True
    try:
        call()
        outcome, typed, message = "ok", False, ""
    except (torchkeep.TorchkeepError, CliFailed) as exc:
        outcome, typed, message = type(exc).__name__, True, str(exc).splitlines()[0][:300]
    except BaseException as exc:  # noqa: BLE001 - reported as a failure by the test
        outcome, typed = type(exc).__name__, False
        message = "".join(traceback.format_exception_only(exc))[-300:]
    finally:
        armed = False
        signal.alarm(0)
    return outcome, typed, message


def _vm_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main(manifest_path: str) -> None:
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    scratch = manifest["scratch"]
    torch.set_num_threads(1)
    # Warm-up: lazy imports and first-call setup happen here, before the hook is armed.
    good = os.path.join(scratch, "good.tk")
    torchkeep.save(_model().state_dict(), good)
    torch.save(_model().state_dict(), os.path.join(scratch, "good.pt"))
    for warm in (good, os.path.join(scratch, "good.pt")):
        for call in file_entry_points(warm, scratch).values():
            attempt(call)
    for call in run_dir_entry_points(scratch).values():
        attempt(call)
    events.clear()
    sys.addaudithook(hook)
    signal.signal(signal.SIGALRM, _alarm)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + MEMORY_HEADROOM, resource.RLIM_INFINITY))
    results = []
    for case, info in manifest["cases"].items():
        if info.get("trusted_control"):  # proves the hook sees a payload that does run
            points = {"load trusted": lambda p=info["path"]: torchkeep.load(p, trusted=True)}
        elif info.get("run_dir"):
            points = run_dir_entry_points(info["path"])
        else:
            points = file_entry_points(info["path"], scratch)
        if "entries" in info:
            points = {k: v for k, v in points.items() if k in info["entries"]}
        for entry, call in points.items():
            outcome, typed, message = attempt(call)
            results.append(
                {
                    "case": case,
                    "entry": entry,
                    "outcome": outcome,
                    "typed": typed,
                    "message": message,
                    "events": list(events),
                    "sentinel": os.path.exists(manifest["sentinel"]),
                }
            )
            events.clear()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
