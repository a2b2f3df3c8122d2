"""DCP folders built chunk by chunk with DCP's own metadata classes: assembly and refusals."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from torchkeep.errors import FormatError, TorchkeepError, UnsafeFileError
from torchkeep.readers.open import open_view

FULL = torch.arange(24, dtype=torch.float32).reshape(6, 4)


def _blob(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_dcp(folder: str, rel: str = "__0_0.distcp", extra: object = 5) -> None:
    """``w`` saved as two row chunks (as two ranks would), plus one pickled value."""
    os.makedirs(folder, exist_ok=True)
    blobs = [_blob(FULL[:3].clone()), _blob(FULL[3:].clone()), _blob(extra)]
    chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([3, 4])),
              ChunkStorageMetadata(torch.Size([3, 0]), torch.Size([3, 4]))]  # fmt: skip
    props = TensorProperties(dtype=torch.float32)
    storage, offset = {}, 0
    keys = [MetadataIndex("w", torch.Size([0, 0]), 0), MetadataIndex("w", torch.Size([3, 0]), 1),
            MetadataIndex("extra")]  # fmt: skip
    for key, blob in zip(keys, blobs):
        storage[key] = _StorageInfo(rel, offset, len(blob))
        offset += len(blob)
    meta = Metadata(
        state_dict_metadata={
            "w": TensorStorageMetadata(props, FULL.shape, chunks),
            "extra": BytesStorageMetadata(),
        },  # fmt: skip
        storage_data=storage,
    )
    with open(os.path.join(folder, ".metadata"), "wb") as handle:
        pickle.dump(meta, handle)
    with open(os.path.join(folder, "__0_0.distcp"), "wb") as handle:
        handle.write(b"".join(blobs))


def test_chunks_are_assembled(tmp_path) -> None:
    write_dcp(str(tmp_path / "d"))
    with open_view(tmp_path / "d") as view:
        assert view.format == "dcp" and view.values == {"extra": 5}
        assert torch.equal(view.get("w"), FULL)
        assert view.check() == []


def test_storage_path_outside_folder_refused(tmp_path) -> None:
    write_dcp(str(tmp_path / "d"), rel="../x.distcp")
    with pytest.raises(FormatError, match="leaves the directory"):
        open_view(tmp_path / "d")


def test_truncated_data_file_reported_by_check(tmp_path) -> None:
    write_dcp(str(tmp_path / "d"))
    data = tmp_path / "d" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-1500])
    with pytest.raises(TorchkeepError):
        open_view(tmp_path / "d")  # the pickled value at the end is gone


def test_untrusted_value_in_data_file_refused(tmp_path) -> None:
    import argparse

    write_dcp(str(tmp_path / "d"), extra=argparse.Namespace(lr=0.5))
    with pytest.raises(UnsafeFileError, match="Namespace"):
        open_view(tmp_path / "d")
    with open_view(tmp_path / "d", trusted=True) as view:
        assert "lr=0.5" in view.values["extra"]


def test_lightning_hparams_object_needs_trust(tmp_path) -> None:
    import argparse

    path = tmp_path / "hp.ckpt"
    torch.save({"pytorch-lightning_version": "2.4.0", "state_dict": {"w": torch.ones(2)},
                "hyper_parameters": argparse.Namespace(lr=0.1)}, path)  # fmt: skip
    with pytest.raises(UnsafeFileError, match="argparse.Namespace"):
        open_view(path)
    with open_view(path, trusted=True) as view:
        assert view.format == "lightning" and "state_dict.w" in view.refs
