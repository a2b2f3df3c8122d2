"""Stock DCP folders in its newer layouts, written by torch's own writers (one process): the
safetensors layouts (HuggingFaceStorageWriter, FileSystemWriter(SAFETENSORS)) read without any
pickle, per-rank metadata files (use_collectives=False) merged; hostile sharding info refused."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemWriter, HuggingFaceStorageWriter
from torch.distributed.checkpoint.filesystem import SerializationFormat

from torchkeep.cli.main import cli
from torchkeep.errors import FormatError
from torchkeep.readers.open import open_view

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STATE = {
    "w": torch.arange(24.0).reshape(4, 6),
    "b": torch.ones(3, dtype=torch.bfloat16),
}


def _writers(tmp_path):
    return {
        "fs-safetensors": FileSystemWriter(
            str(tmp_path / "st"), serialization_format=SerializationFormat.SAFETENSORS
        ),
        "hf": HuggingFaceStorageWriter(str(tmp_path / "hf")),
        "hf-distributed": HuggingFaceStorageWriter(str(tmp_path / "hfd"), save_distributed=True),
    }


@pytest.mark.parametrize("kind", ["fs-safetensors", "hf", "hf-distributed"])
def test_stock_safetensors_layouts_read_without_pickle(tmp_path, kind, monkeypatch):
    writer = _writers(tmp_path)[kind]
    dcp.save(dict(STATE), storage_writer=writer)
    folder = str(writer.path if kind != "hf-distributed" else tmp_path / "hfd")

    def refuse(*_a, **_k):
        raise AssertionError("unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with open_view(folder) as view:
        assert view.format == "dcp-safetensors"
        for name, value in STATE.items():
            assert torch.equal(view.get(name), value)
    out = str(tmp_path / "out.safetensors")
    result = CliRunner().invoke(cli, ["convert", folder, out])
    assert result.exit_code == 0, result.output
    converted = load_file(out)
    assert all(torch.equal(converted[k], v) for k, v in STATE.items())


def test_per_rank_metadata_files_are_merged(tmp_path):
    folder = str(tmp_path / "pr")
    dcp.save(dict(STATE), storage_writer=FileSystemWriter(folder), use_collectives=False)
    assert "__0.metadata" in os.listdir(folder) and ".metadata" not in os.listdir(folder)
    with open_view(folder) as view:
        assert view.format == "dcp"
        assert all(torch.equal(view.get(k), v) for k, v in STATE.items())


def _shards(folder, parts: list[tuple[str, dict, dict]]) -> str:
    """Rank files as HuggingFaceStorageWriter(save_distributed=True) writes them."""
    os.makedirs(folder, exist_ok=True)
    for name, tensors, offsets in parts:
        info = {k: {"saved_offsets": v} for k, v in offsets.items()}
        meta = {"DCP_SHARDING_INFO": json.dumps(info), "DCP_VERSION": "1.0", "format": "pt"}
        save_file(tensors, os.path.join(folder, name), metadata=meta)
    return folder


def _two_ranks(tmp_path, second_offset=(2, 0), second_rows=2):
    w = STATE["w"]
    return _shards(
        str(tmp_path / "ranks"),
        [
            ("shard-00001-model-00001-of-00001.safetensors", {"w": w[:2].clone()}, {"w": [0, 0]}),
            (
                "shard-00002-model-00001-of-00001.safetensors",
                {"w": w[2 : 2 + second_rows].clone()},
                {"w": list(second_offset)},
            ),
        ],
    )


def test_chunks_of_several_ranks_are_assembled(tmp_path):
    with open_view(_two_ranks(tmp_path)) as view:
        assert torch.equal(view.get("w"), STATE["w"])


@pytest.mark.parametrize(
    "offset, rows, words",
    [((1, 0), 2, "overlap"), ((3, 0), 1, "cover"), ((2, 1), 2, "cover")],
)
def test_hostile_chunk_layouts_refused(tmp_path, offset, rows, words):
    with pytest.raises(FormatError, match=words):
        open_view(_two_ranks(tmp_path, offset, rows))


@pytest.mark.parametrize("offsets", [[0], [-1, 0], ["0", 0], [2**63, 0]])
def test_bad_saved_offsets_refused(tmp_path, offsets):
    folder = _shards(str(tmp_path / "bad"), [("a.safetensors", {"w": STATE["w"]}, {"w": offsets})])
    with pytest.raises(FormatError, match="saved_offsets"):
        open_view(folder)


def test_sharding_info_not_json_refused(tmp_path):
    folder = str(tmp_path / "nojson")
    os.makedirs(folder)
    meta = {"DCP_SHARDING_INFO": "{not json", "format": "pt"}
    save_file({"w": STATE["w"]}, os.path.join(folder, "a.safetensors"), metadata=meta)
    with pytest.raises(FormatError, match="a.safetensors"):
        open_view(folder)
