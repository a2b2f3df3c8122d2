"""``torchkeep prune``: delete the steps a retention policy does not keep."""

from __future__ import annotations

from typing import Any

import click

from .. import retention
from ..errors import TorchkeepError
from ..storage.urls import backend_for
from .ls import listing, policy_options
from .render import opt, out, print_json


@click.command("prune")
@click.argument("run_dir", type=click.Path())
@policy_options
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@opt("json")
def prune_cmd(run_dir: str, dry_run: bool, as_json: bool, **policy: Any) -> None:
    """Delete the steps of RUN_DIR that no policy keeps (the manager's own policies).

    The newest step is always kept. Refuses while a training run holds the directory lock.

    \b
    Example:
      torchkeep prune checkpoints/ --keep-last 3 --keep-best 1 --monitor val_loss --dry-run
    """
    if not policy["monitor"] and all(
        policy[k] is None for k in ("keep_last", "keep_best", "keep_every")
    ):
        raise click.UsageError("give a policy: --keep-last, --keep-best/--monitor or --keep-every")
    before = listing(run_dir, **policy)
    try:
        doomed = retention.prune(run_dir, dry_run=dry_run, backend=backend_for(run_dir), **policy)
    except ValueError as exc:
        raise TorchkeepError(f"{run_dir}: {exc}") from exc
    kept = [row["step"] for row in before["steps"] if row["step"] not in doomed]
    if as_json:
        print_json({"path": run_dir, "dry_run": dry_run, "deleted": doomed, "kept": kept})
        return
    console = out()
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {len(doomed)} step(s): {', '.join(map(str, doomed)) or '-'}")
    console.print(f"kept {len(kept)} step(s): {', '.join(map(str, kept)) or '-'}")
