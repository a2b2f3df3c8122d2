"""The on-disk format: header, typed tree, layout, checksums."""
