"""``torchkeep diff``: compare two checkpoints tensor by tensor (any formats)."""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import click
import torch

from ..format.dtypes import dtype_name
from ..readers.view import CheckpointView
from .errors import EXIT_FAILED
from .render import key_table, opt, out, print_json, progress_bar
from .safe_text import sanitize
from .sources import open_view
from .structure import compare_structure, is_description_value, kind_of, structure_of

_CHUNK = 1 << 20  # elements compared at a time: bounds the float64 temporaries (8 MB each)


def compare_tensors(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> dict:
    """Equality within tolerance, max |a-b| and ||a-b|| / ||a|| of two same-shape tensors.

    Works through the flattened tensors chunk by chunk, so memory stays bounded whatever their
    size. NaNs at the same positions count as equal.
    """
    a, b = _comparable(a), _comparable(b)
    if a.dtype == b.dtype and not a.is_complex() and torch.equal(a, b):
        return {"equal": True, "max_abs_diff": 0.0, "rel_l2_diff": 0.0}  # the common case, fast
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    equal, max_abs, diff_sq, norm_sq = True, 0.0, 0.0, 0.0
    for lo in range(0, fa.numel(), _CHUNK):
        x = fa[lo : lo + _CHUNK].to(wide)
        y = fb[lo : lo + _CHUNK].to(wide)
        both_nan = torch.isnan(x) & torch.isnan(y)
        delta = torch.where(both_nan, torch.zeros_like(x), x - y).abs()
        delta = torch.nan_to_num(delta, nan=math.inf)  # NaN on one side only: infinitely apart
        if delta.numel():
            max_abs = max(max_abs, float(delta.max()))
        diff_sq += float(torch.where(delta.isfinite(), delta, 0).square().sum())
        norm_sq += float(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).abs().square().sum())
        if atol == 0 and rtol == 0:
            same = torch.where(both_nan, True, x == y)
        else:
            same = both_nan | (delta <= atol + rtol * y.abs())
        equal = equal and bool(same.all())
    diff = math.sqrt(diff_sq) if max_abs != math.inf else math.inf
    norm = math.sqrt(norm_sq)
    rel = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    return {"equal": equal, "max_abs_diff": max_abs, "rel_l2_diff": rel}


@functools.cache
def _numeric(dtype: torch.dtype) -> bool:
    """Whether torch compares and widens tensors of ``dtype`` (not so for uint4, complex32,
    float4 pairs, bits*...: torch raises NotImplementedError for them)."""
    try:
        x = torch.zeros(2, dtype=dtype)
        torch.equal(x, x)
        x.to(torch.complex128 if dtype.is_complex else torch.float64)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def _comparable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, its dequantized values, or its raw bytes when torch cannot compare it."""
    if t.is_quantized:
        return t.dequantize()
    if _numeric(t.dtype):
        return t
    return t.contiguous().reshape(-1).view(torch.uint8)


def _sig(view: CheckpointView, name: str) -> dict:
    ref = view.refs[name]
    return {"dtype": dtype_name(ref.dtype), "shape": list(ref.shape)}


def model_sides(a: CheckpointView, b: CheckpointView) -> dict[str, Any]:
    """Module structures compared when both sides are whole models; a note when one is."""
    sa, sb = structure_of(a), structure_of(b)
    if sa is None and sb is None:
        return {}
    if sa is None or sb is None:
        side, other = ("A", "B") if sa is not None else ("B", "A")
        return {
            "compared": False,
            "note": f"{side} is a whole model, {other} holds only tensors and values: "
            "compared the weights; the module structure is only in " + side,
        }
    differences = compare_structure(sa, sb)
    return {"compared": True, "modules": len(sa), "differences": differences}


def _plain_values(view: CheckpointView, models: dict[str, Any]) -> dict[str, Any]:
    """The view's values, less a model description when structures are compared instead."""
    if not models:
        return view.values
    return {k: v for k, v in view.values.items() if not is_description_value(k)}


def diff_views(a: CheckpointView, b: CheckpointView, atol: float, rtol: float) -> dict[str, Any]:
    """The ``--json`` object of ``diff``; ``equal`` is its verdict."""
    only_a = [n for n in a.refs if n not in b.refs]
    only_b = [n for n in b.refs if n not in a.refs]
    common = [n for n in a.refs if n in b.refs]
    changed, tensors = [], []
    with progress_bar("comparing", sum(a.refs[n].nbytes for n in common)) as advance:
        for name in common:
            sa, sb = _sig(a, name), _sig(b, name)
            if sa != sb:
                changed.append({"name": name, "a": sa, "b": sb})
            else:
                row = compare_tensors(a.get(name), b.get(name), atol, rtol)
                tensors.append({"name": name, **row})
            advance(a.refs[name].nbytes)
    models = model_sides(a, b)
    va, vb = _plain_values(a, models), _plain_values(b, models)
    values = {
        "only_in_a": {k: v for k, v in va.items() if k not in vb},
        "only_in_b": {k: v for k, v in vb.items() if k not in va},
        "changed": {k: {"a": v, "b": vb[k]} for k, v in va.items() if k in vb and vb[k] != v},
    }
    equal = not (only_a or only_b or changed or any(not t["equal"] for t in tensors))
    equal = equal and not any(values.values()) and not models.get("differences")
    return {
        "equal": equal,
        "a": {"path": a.path, "format": a.format, "kind": kind_of(a)},
        "b": {"path": b.path, "format": b.format, "kind": kind_of(b)},
        "structure": models,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "changed": changed,
        "tensors": tensors,
        "values": values,
    }


def _print(result: dict[str, Any]) -> None:
    console = out()
    for side in ("a", "b"):
        info = result[side]
        console.print(f"{side.upper()}: {info['path']} ({info['format']}: {info['kind']})")
    models = result.get("structure") or {}
    if models.get("note"):
        console.print(f"note: {models['note']}")
    for problem in models.get("differences", []):
        console.print(f"[yellow]~ structure[/yellow] {problem}")
    if models.get("compared") and not models["differences"]:
        console.print(f"structure: the same {models['modules']} modules (class, train/eval mode)")
    for name in result["only_in_a"]:
        console.print(f"[red]- only in A[/red] {name}")
    for name in result["only_in_b"]:
        console.print(f"[green]+ only in B[/green] {name}")
    for row in result["changed"]:
        console.print(
            f"[yellow]~ changed[/yellow] {row['name']}: {row['a']['dtype']}{row['a']['shape']}"
            f" -> {row['b']['dtype']}{row['b']['shape']}"
        )
    differing = [t for t in result["tensors"] if not t["equal"]]
    if differing:
        table = key_table("tensor", "max |a-b|", "rel L2", title="differing tensors")
        for row in differing:
            table.add_row(row["name"], f"{row['max_abs_diff']:.3g}", f"{row['rel_l2_diff']:.3g}")
        console.print(table)
    values = result["values"]
    for key, value in values["only_in_a"].items():
        console.print(f"[red]- value only in A[/red] {key} = {value}")
    for key, value in values["only_in_b"].items():
        console.print(f"[green]+ value only in B[/green] {key} = {value}")
    for key, pair in values["changed"].items():
        console.print(f"[yellow]~ value[/yellow] {key}: {pair['a']} -> {pair['b']}")
    same = len(result["tensors"]) - len(differing)
    verdict = "equal" if result["equal"] else "different"
    console.print(f"{same} common tensors equal, {len(differing)} differ: [bold]{verdict}[/bold]")


@click.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@opt("json")
@opt("trusted")
@click.option("--atol", default=0.0, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", default=0.0, show_default=True, help="Relative tolerance.")
def diff_cmd(a: str, b: str, as_json: bool, trusted: bool, atol: float, rtol: float) -> None:
    """Compare checkpoints A and B: keys, shapes, dtypes, values. Exit 1 when they differ.

    \b
    Example:
      torchkeep diff before.pt after.safetensors --atol 1e-6
    """
    with open_view(a, trusted=trusted) as va, open_view(b, trusted=trusted) as vb:
        result = diff_views(va, vb, atol, rtol)
    if as_json:
        print_json(result)
    else:
        _print(sanitize(result))
    if not result["equal"]:
        sys.exit(EXIT_FAILED)
