"""``torchkeep`` console entry point: the command group and its commands.

Exit codes: 0 success; 1 check failed (diff: different, verify: corrupt, scan: unsafe);
2 usage error; 3 the checkpoint could not be read (missing, unknown format, malformed,
corrupt header); 4 a pickle was refused (pass --trusted only for files you trust).
``TORCHKEEP_DEBUG=1`` shows Python tracebacks.
"""

from __future__ import annotations

import click

from .. import __version__
from ..transfer.memcopy import describe as describe_copy
from .convert import convert_cmd
from .diff import diff_cmd
from .errors import GuardedGroup
from .inspect import inspect_cmd
from .ls import ls_cmd
from .prune import prune_cmd
from .scan import scan_cmd
from .verify import verify_cmd

EPILOG = (
    "Exit codes: 0 ok; 1 check failed (diff differs, verify corrupt, scan unsafe); 2 usage "
    "error; 3 unreadable checkpoint (missing, unknown format, malformed); 4 pickle refused "
    "(needs --trusted). TORCHKEEP_DEBUG=1 shows tracebacks."
)


@click.group(
    cls=GuardedGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(
    __version__, prog_name="torchkeep", message=f"%(prog)s %(version)s\n{describe_copy()}"
)
def cli() -> None:
    """Inspect, compare, convert and verify PyTorch checkpoints of any format, safely.

    Reads torchkeep files and run directories, safetensors (single or HF-sharded),
    torch.save (zip and legacy; weights-only unless --trusted), Lightning .ckpt,
    torch.distributed.checkpoint folders and Accelerate save_state folders.
    """


for command in (inspect_cmd, diff_cmd, convert_cmd, verify_cmd, ls_cmd, prune_cmd, scan_cmd):
    cli.add_command(command)


def main() -> None:
    """Console script ``torchkeep``."""
    cli(prog_name="torchkeep")


if __name__ == "__main__":
    main()
