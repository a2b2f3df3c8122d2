"""Storage layer: atomic commits on local disks (and, later, commit markers on object stores)."""

from .io import DEFAULT_OPS, FileOps, ops, use_ops, write_all
from .local import atomic_file, commit_dir, is_temp, make_temp_dir, sweep_temps, temp_name

__all__ = [
    "DEFAULT_OPS",
    "FileOps",
    "atomic_file",
    "commit_dir",
    "is_temp",
    "make_temp_dir",
    "ops",
    "sweep_temps",
    "temp_name",
    "use_ops",
    "write_all",
]
