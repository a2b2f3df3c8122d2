"""``torchkeep`` console entry point: the command group and its commands.

Exit codes: 0 success; 1 check failed (diff: different, verify: corrupt, scan: unsafe);
2 usage error; 3 the checkpoint could not be read (missing, unknown format, malformed,
corrupt header); 4 a pickle was refused (pass --trusted only for files you trust).
``TORCHKEEP_DEBUG=1`` shows Python tracebacks.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .. import __version__
from .convert import convert_cmd
from .diff import diff_cmd
from .errors import EXIT_ERROR, GuardedGroup, debug
from .inspect import inspect_cmd
from .ls import ls_cmd
from .prune import prune_cmd
from .safe_text import one_line_safe
from .scan import scan_cmd
from .verify import verify_cmd

EPILOG = (
    "Exit codes: 0 ok; 1 check failed (diff differs, verify corrupt, scan unsafe); 2 usage "
    "error; 3 unreadable checkpoint (missing, unknown format, malformed); 4 pickle refused "
    "(needs --trusted). With --trusted, classes a pickle names are also imported from the "
    "current directory, as with `python -c`. TORCHKEEP_DEBUG=1 shows tracebacks."
)


class CliGroup(GuardedGroup):
    """:class:`GuardedGroup`; also one line for a trusted pickle whose classes do not import."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ImportError as exc:
            if debug():
                raise
            name = one_line_safe(repr(getattr(exc, "name", None) or "a module"))[:120]
            click.echo(
                f"error: the pickle needs the module {name}, which cannot be imported "
                f"({one_line_safe(str(exc))[:200]}); run the command where "
                "the model's code is importable (with --trusted the current directory is "
                "searched, as with `python -c`) or set PYTHONPATH",
                err=True,
            )
            ctx.exit(EXIT_ERROR)


@click.group(cls=CliGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="torchkeep")
def cli() -> None:
    """Inspect, compare, convert and verify PyTorch checkpoints of any format, safely.

    Reads torchkeep files and run directories, safetensors (single or HF-sharded),
    torch.save (zip and legacy; weights-only unless --trusted), Lightning .ckpt,
    torch.distributed.checkpoint folders and Accelerate save_state folders.
    """


for command in (inspect_cmd, diff_cmd, convert_cmd, verify_cmd, ls_cmd, prune_cmd, scan_cmd):
    cli.add_command(command)


def import_from_cwd(argv: list[str]) -> None:
    """With ``--trusted``, let a pickled model's classes import from the current directory.

    ``python -c``/``python -m`` put the current directory first on ``sys.path``; a console
    script does not, so ``torchkeep convert model.pth model.tk --trusted`` run next to
    ``model.py`` could not find ``model``. Only a trusted run (which may unpickle, i.e. run
    code from the file anyway) gets it.
    """
    cwd = os.getcwd()
    if "--trusted" not in argv:  # `python -m torchkeep` put it first; only trust may use it
        if sys.path and sys.path[0] in ("", cwd):
            del sys.path[0]
    elif "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def main() -> None:
    """Console script ``torchkeep`` (also ``python -m torchkeep``)."""
    import_from_cwd(sys.argv[1:])
    cli(prog_name="torchkeep")


if __name__ == "__main__":
    main()
