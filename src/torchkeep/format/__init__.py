"""The on-disk encoding only: header, typed tree, layout, dtypes, checksums.

Bytes in, structures out; no file handles (reading and writing files is :mod:`torchkeep.transfer`).
"""
