"""``torchkeep inspect``: what a checkpoint holds, without running code from it."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from ..format.dtypes import dtype_name
from ..readers.view import CheckpointView, jsonable
from .render import err, human, key_table, opt, out, print_json, progress_bar, tensor_row
from .safe_text import sanitize
from .sources import open_view

_OPTIMIZER_SIGNS = [
    ({"betas", "amsgrad", "decoupled_weight_decay"}, "AdamW"),
    ({"betas", "amsgrad"}, "Adam"),
    ({"momentum", "nesterov", "dampening"}, "SGD"),
    ({"alpha", "centered"}, "RMSprop"),
    ({"lr_decay", "initial_accumulator_value"}, "Adagrad"),
    ({"rho", "eps"}, "Adadelta"),
]


def guess_optimizer(group: dict) -> str:
    """Optimizer class inferred from the hyper-parameter names of a param group."""
    keys = set(group)
    for signs, name in _OPTIMIZER_SIGNS:
        if signs <= keys:
            if name == "AdamW" and not group.get("decoupled_weight_decay"):
                continue
            return name
    return "unknown"


def find_optimizers(obj: Any, path: str = "") -> list[dict]:
    """Every optimizer state_dict inside the checkpoint: where, type and hyper-parameters."""
    found = []
    if isinstance(obj, dict):
        groups = obj.get("param_groups")
        if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups):
            hyper = {k: jsonable(v) for k, v in groups[0].items() if k != "params"}
            found.append(
                {
                    "path": path or "<root>",
                    "type": guess_optimizer(groups[0]),
                    "param_groups": len(groups),
                    "hyper_parameters": hyper,
                }
            )
        for key, value in obj.items():
            found += find_optimizers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found += find_optimizers(value, f"{path}.{i}" if path else str(i))
    return found


def dtype_breakdown(view: CheckpointView) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for ref in view.refs.values():
        row = table.setdefault(dtype_name(ref.dtype), {"tensors": 0, "params": 0, "nbytes": 0})
        row["tensors"] += 1
        row["params"] += ref.numel
        row["nbytes"] += ref.nbytes
    return table


def checksum_status(view: CheckpointView, verify: bool) -> dict | None:
    if view.checksum_algorithm is None:
        return None
    if not verify:
        return {"algorithm": view.checksum_algorithm, "status": "not checked", "corrupt": []}
    with progress_bar("verifying", view.total_bytes) as advance:
        problems = view.check(advance)
    status = "ok" if not problems else "corrupt"
    return {"algorithm": view.checksum_algorithm, "status": status, "corrupt": problems}


def summary(view: CheckpointView, verify: bool = True) -> dict[str, Any]:
    """The ``--json`` object of ``inspect``."""
    info: dict[str, Any] = {
        "path": view.path,
        "format": view.format,
        "num_tensors": len(view.refs),
        "num_params": view.num_params,
        "total_bytes": view.total_bytes,
        "dtypes": dtype_breakdown(view),
        "tensors": [tensor_row(ref) for ref in view.refs.values()],
        "metadata": dict(view.values),
        "optimizers": find_optimizers(view.skeleton),
        "checksums": checksum_status(view, verify),
        "notes": list(view.notes),
    }
    shards = getattr(view, "shard_table", None)
    if shards is not None:  # a sharded checkpoint: which rank wrote what, checked per file
        info["shards"] = shards()
    steps = getattr(view, "steps", None)
    if steps:  # a run directory: what is shown is its newest step
        info["step"] = steps[-1].step
        info["steps"] = [s.step for s in steps]
    return info


def _print(info: dict[str, Any], limit: int) -> None:
    console = out()
    console.print(f"[bold]{info['path']}[/bold]  format: [cyan]{info['format']}[/cyan]")
    if "step" in info:
        console.print(f"newest of {len(info['steps'])} steps: step {info['step']}")
    console.print(
        f"{info['num_tensors']} tensors, {info['num_params']:,} parameters, "
        f"{human(info['total_bytes'])} ({info['total_bytes']:,} bytes)"
    )
    sums = info["checksums"]
    if sums is None:
        console.print("checksums: none in this format (verify checks structure only)")
    else:
        console.print(f"checksums: {sums['algorithm']}, {sums['status']}")
        for problem in sums["corrupt"]:
            console.print(f"  [red]corrupt[/red] {problem}")
    dtypes = Table("dtype", "tensors", "parameters", "bytes", title="dtypes", title_justify="left")
    for name, row in info["dtypes"].items():
        dtypes.add_row(name, str(row["tensors"]), f"{row['params']:,}", human(row["nbytes"]))
    console.print(dtypes)
    tensors = key_table("name", "dtype", "shape", "size", title="tensors")
    for row in info["tensors"][:limit]:
        tensors.add_row(row["name"], row["dtype"], str(row["shape"]), human(row["nbytes"]))
    console.print(tensors)
    if len(info["tensors"]) > limit:
        console.print(f"... {len(info['tensors']) - limit} more (use --limit 0 for all)")
    for opt_info in info["optimizers"]:
        hyper = ", ".join(f"{k}={v}" for k, v in opt_info["hyper_parameters"].items())
        console.print(f"optimizer at {opt_info['path']}: {opt_info['type']} ({hyper})")
    if info.get("shards"):
        _print_shards(info["shards"])
    if info["metadata"]:
        values = key_table("key", "value", title="values")
        for key, value in info["metadata"].items():
            shown = str(value)
            values.add_row(key, shown if len(shown) <= 120 else shown[:117] + "...")
        console.print(values)
    for note in info["notes"]:
        err().print(f"note: {note}")


def _print_shards(rows: list[dict]) -> None:
    table = key_table("rank", "file", "size", "chunks", "tensor bytes", "checksums", title="shards")
    for row in rows:
        status = row["status"]
        shown = {"ok": "[green]ok[/green]", "corrupt": "[red]corrupt[/red]"}.get(status, status)
        table.add_row(
            str(row["rank"]),
            row["file"],
            human(row["bytes"]),
            str(row["chunks"]),
            human(row["tensor_bytes"]),
            shown,
        )
    out().print(table)


@click.command("inspect")
@click.argument("path", type=click.Path())
@opt("json")
@opt("trusted")
@click.option("--no-verify", is_flag=True, help="Skip checking checksums (header only).")
@click.option("--limit", default=50, show_default=True, help="Rows of the tensor table (0: all).")
def inspect_cmd(path: str, as_json: bool, trusted: bool, no_verify: bool, limit: int) -> None:
    """Show format, tensors, dtypes, parameter count and non-tensor values of PATH.

    \b
    Example:
      torchkeep inspect model.safetensors
      torchkeep inspect run/step_000100 --json | jq .num_params
    """
    with open_view(path, trusted=trusted) as view:
        info = summary(view, verify=not no_verify)
    if as_json:
        print_json(info)
    else:
        _print(sanitize(info), limit if limit > 0 else len(info["tensors"]))
