"""``torchkeep convert``: between torchkeep, safetensors (file or sharded folder), torch.save."""

from __future__ import annotations

import click
import torch

from .. import convert as core
from ..model import save_model
from .render import err, human, opt, out, progress_bar
from .safe_text import markup_safe
from .sources import open_view


def _whole_model(view: object, dst: str, fmt: str | None, shard: int | None) -> bool:
    """A pickled ``nn.Module`` (opened with --trusted): re-saved as a safe whole-model file
    when DST is a torchkeep file; otherwise False, and DST gets its state dict (said on stderr).
    """
    model = getattr(view, "obj", None)
    if not isinstance(model, torch.nn.Module):
        return False
    if shard is None and (fmt or core.destination_format(dst, None)) == core.TORCHKEEP:
        save_model(model, dst)
        return True
    err().print(
        f"note: the source holds a whole model ({markup_safe(type(model).__qualname__)}); "
        f"{markup_safe(dst)} gets its state dict (weights only): the module structure was "
        "dropped. Convert to a .tk file to keep it (torchkeep.load_model then rebuilds the model "
        "without pickle)"
    )
    return False


@click.command("convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--dtype", type=click.Choice(sorted(core.DTYPES)), help="Cast floating tensors.")
@click.option("--max-shard-size", help="Write a Hugging Face sharded folder (e.g. 5GB).")
@click.option(
    "--to",
    "fmt",
    type=click.Choice([core.TORCHKEEP, core.SAFETENSORS, core.TORCH]),
    help="Output format (default: from DST's extension; .tk/other = torchkeep).",
)
@opt("trusted")
def convert_cmd(
    src: str,
    dst: str,
    dtype: str | None,
    max_shard_size: str | None,
    fmt: str | None,
    trusted: bool,
) -> None:
    """Convert SRC (any readable format) to DST, one tensor at a time.

    DST's extension picks the format: .safetensors (safetensors), .pt/.pth/.bin/.ckpt
    (torch.save), anything else (torchkeep). With --max-shard-size DST is a folder of
    safetensors shards plus model.safetensors.index.json.

    A whole model saved with torch.save(model) needs --trusted (unpickling runs code). Then,
    as with `python -c`, its classes are also imported from the current directory (run the
    command next to model.py). To a .tk file the model keeps its structure (load it with
    torchkeep.load_model, no trust needed); to .safetensors or .pt only its state dict is
    written, and the dropped structure is reported.

    \b
    Examples:
      torchkeep convert pytorch_model.bin model.safetensors --dtype bfloat16
      torchkeep convert dcp_checkpoint/ model --max-shard-size 5GB
      torchkeep convert old_whole_model.pth model.tk --trusted
    """
    shard = core.parse_size(max_shard_size) if max_shard_size else None
    with open_view(src, trusted=trusted) as view:
        if _whole_model(view, dst, fmt, shard):
            out().print(
                f"wrote {markup_safe(dst)}: whole model from {markup_safe(view.format)} "
                "(torchkeep model file)"
            )
            return
        with progress_bar("converting", view.total_bytes) as advance:
            written = core.convert_view(
                view,
                dst,
                fmt=fmt,
                dtype=core.DTYPES.get(dtype or ""),
                max_shard_size=shard,
                progress=advance,
            )
        out().print(
            f"wrote {markup_safe(dst)}: {written}{' (sharded)' if shard else ''}, "
            f"{len(view.refs)} tensors, "
            f"{human(view.total_bytes)} read from {markup_safe(view.format)}"
        )
        if written == core.SAFETENSORS and view.values:
            err().print(
                f"note: {len(view.values)} non-tensor values "
                f"(e.g. {markup_safe(str(next(iter(view.values))))}) "
                "are not stored: safetensors holds tensors only; convert to .tk to keep them"
            )
        for note in view.notes:
            err().print(f"note: {markup_safe(note)}")
