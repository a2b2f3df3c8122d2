"""``torchkeep ls``: the steps of a run directory, why each is kept, and leftovers."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import click
from rich.table import Table

from .. import retention
from ..errors import CheckpointNotFoundError, FormatError, TorchkeepError
from ..storage.run_dir import list_leftovers, list_steps
from ..storage.urls import backend_for, is_url, remote_backend_for
from .render import human, opt, out, print_json
from .safe_text import markup_safe, sanitize

POLICY_OPTIONS = [
    click.option("--keep-last", type=int, help="Keep the N newest steps."),
    click.option("--keep-best", type=int, help="Keep the K best steps by --monitor."),
    click.option("--monitor", help="Metric that ranks steps (e.g. val_loss)."),
    click.option("--mode", type=click.Choice(retention.MODES), default="min", show_default=True),
    click.option("--keep-every", type=int, help="Keep every step divisible by N."),
]


def policy_options(fn: Any) -> Any:
    for option in reversed(POLICY_OPTIONS):
        fn = option(fn)
    return fn


def listing(run_dir: str, **policy: Any) -> dict[str, Any]:
    """The ``--json`` object of ``ls``."""
    backend = backend_for(run_dir)  # a URL: the object store (credentials from the env)
    kind = remote_backend_for(run_dir).kind(run_dir) if is_url(run_dir) else _local_kind(run_dir)
    if kind is None:
        raise CheckpointNotFoundError(f"{run_dir}: no such run directory")
    if kind != "dir":
        raise FormatError(f"{run_dir}: is a file; ls and prune take a run directory")
    steps = list_steps(run_dir, backend)
    if not any(v is not None for k, v in policy.items() if k != "mode"):
        policy = recorded_policy(steps) or policy
    reasons = retention.with_referenced(steps, retention.kept_reasons(steps, **policy))
    rows = [
        {
            "step": s.step,
            "path": s.path,
            "time": s.time,
            "size": s.size,
            "metrics": dict(s.metrics or {}),
            "kept": reasons.get(s.step, []),
            "problems": list(s.problems),
        }
        for s in steps
    ]
    return {
        "path": run_dir,
        "policy": policy,
        "steps": rows,
        "leftovers": list(list_leftovers(run_dir, backend)),
    }


def _local_kind(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    return "dir" if os.path.isdir(path) else "file"


def recorded_policy(steps: list[Any]) -> dict[str, Any] | None:
    """The retention policy the manager recorded with the newest step (None if it did not)."""
    names = {"keep_last", "keep_best", "monitor", "mode", "keep_every"}
    for step in reversed(steps):
        policy = getattr(step, "policy", None)
        if isinstance(policy, dict) and set(policy) == names:
            try:
                retention.validate_policy(**policy)
            except (TorchkeepError, TypeError, ValueError):  # a damaged record is not trusted
                return None
            return policy
    return None


def _when(stamp: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(stamp)).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OSError, OverflowError):
        return str(stamp)


@click.command("ls")
@click.argument("run_dir", type=click.Path())
@opt("json")
@policy_options
def ls_cmd(run_dir: str, as_json: bool, **policy: Any) -> None:
    """List the committed steps of RUN_DIR with time, size, metrics and why each is kept.

    The policy options show which steps that policy would keep; without them, the policy
    the manager recorded with the newest step is used (all kept when none was recorded).
    Incomplete leftovers (interrupted saves) are flagged.

    \b
    Example:
      torchkeep ls checkpoints/ --keep-last 2 --keep-best 1 --monitor val_loss
    """
    result = listing(run_dir, **policy)
    if as_json:
        print_json(result)
        return
    result, run_dir = sanitize(result), markup_safe(run_dir)
    if not result["steps"] and not result["leftovers"]:
        out().print(
            f"{run_dir}: no committed steps (a run directory holds the step-NNNNNNNNNN/ "
            "folders that CheckpointManager writes; for a checkpoint file use inspect)"
        )
        return
    table = Table("step", "time", "size", "metrics", "kept", title=run_dir, title_justify="left")
    for row in result["steps"]:
        metrics = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row["metrics"].items()
        )
        kept = ", ".join(row["kept"]) or "[red]prunable[/red]"
        table.add_row(str(row["step"]), _when(row["time"]), human(row["size"]), metrics, kept)
    console = out()
    console.print(table)
    for row in result["steps"]:
        for problem in row["problems"]:
            console.print(f"[yellow]step {row['step']}[/yellow]: {problem}")
    for name in result["leftovers"]:
        console.print(f"[yellow]incomplete[/yellow] {name} (interrupted save; swept on next run)")
