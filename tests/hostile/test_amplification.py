"""Issue 18, findings 6 and 8: amplification bombs and malformed metadata through every entry
point, in a guarded process (RLIMIT_AS, per-call time bound, audit hook; tests/hostile/guard.py).

Each bomb is a small file or folder claiming something huge (stride-0 views, repeated
references, colliding dict keys, long keys above many values, 2**70 sizes, DCP metadata with
huge sizes, escaping paths, symlinks). Every library entry point must raise a TorchkeepError
naming the file, every CLI command exit non-zero with one line, within the bounds.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from bombs import P, dcp_bombs, torch_bombs, torchkeep_bombs
from click.testing import CliRunner
from guard import run_guarded

import torchkeep
from torchkeep import knobs
from torchkeep.cli.main import cli
from torchkeep.errors import FormatError
from torchkeep.format import bounds

#: Bombs that ``torchkeep.load`` may return: the object is small (a deep list, many short
#: values under one long key); what it would amplify is the views' flattened names, refused there.
LOAD_OK = {"pt_deep_lists", "pt_long_key_paths"}
#: Entry points that only read the header and data of a torchkeep file (not the tree) or take
#: the parts they need: load_state_dict skips non-tensor values, scan reads only pickles.
LAZY = {"load_state_dict", "load_checkpoint", "cli scan"}
#: Entry points that read a torchkeep file's header and data but do not decode its tree.
HEADER_ONLY = {"verify", "open_file"}
LIBRARY = {"load", "load mmap", "open_view", "verify"}


def _write(tmp_path) -> dict[str, dict]:
    cases = {}
    for name, blob in {**torchkeep_bombs(), **torch_bombs()}.items():
        path = tmp_path / name
        path.write_bytes(blob)
        cases[name] = {"path": str(path)}
    for name, path in dcp_bombs(str(tmp_path / "dcp")).items():
        cases[name] = {"path": path}
    return cases


def _acceptable(r: dict) -> bool:
    if r["typed"]:
        return True
    if r["outcome"] != "ok":
        return False
    if r["case"].startswith("tk_") and r["entry"] in HEADER_ONLY:
        return True  # the tree is refused by whatever decodes it
    return r["entry"] in LAZY or (r["case"] in LOAD_OK and r["entry"] not in ("open_view",))


def test_bombs_are_refused_everywhere_within_bounds(tmp_path) -> None:
    cases = _write(tmp_path)
    results = run_guarded(cases, tmp_path)
    bad = [r for r in results if r["events"] or r["sentinel"] or not _acceptable(r)]
    assert bad == [], "\n".join(
        f"{r['case']} | {r['entry']} | {r['outcome']} | {r['message'][:100]}" for r in bad
    )
    assert len(results) >= 14 * len(cases)
    # The refusals say what was wrong and name the file (or folder) they came from.
    for r in results:
        if r["typed"] and r["entry"] in LIBRARY:
            assert r["case"] in r["message"] or "dcp" in r["message"], r
    refused = {r["case"] for r in results if r["entry"] == "cli convert" and r["typed"]}
    assert refused == set(cases), sorted(set(cases) - refused)


def test_expansion_limit_names_the_knob_and_the_knob_raises_it(tmp_path, monkeypatch) -> None:
    path = tmp_path / "expand.tk"
    path.write_bytes(torchkeep_bombs()["tk_expand_32gib"])
    with pytest.raises(FormatError, match="TORCHKEEP_MAX_EXPANSION") as info:
        torchkeep.load(path)
    assert str(path) in str(info.value)
    monkeypatch.setattr(knobs, "EXPANSION_FLOOR_BYTES", 2**40)
    tensor = torchkeep.load(path)  # a trusted file: the limit was raised, the view is lazy
    assert tensor.shape == (2**16, 2**16) and tensor.stride() == (0, 0)


def test_legitimate_expanded_views_stay_readable(tmp_path) -> None:
    """An expanded buffer (HF position ids) and tied weights are far under the limit."""
    ids = torch.arange(512).expand(1, -1)
    weight = torch.randn(64, 8)
    wide = torch.ones(1).expand(4096)
    state = {"position_ids": ids, "embed": weight, "head": weight, "wide": wide}
    tk, pt = tmp_path / "a.tk", tmp_path / "a.pt"
    torchkeep.save(state, tk)
    torch.save(state, pt)
    for path in (tk, pt):
        out = torchkeep.load(path)
        assert torch.equal(out["position_ids"], ids) and out["wide"].shape == (4096,)
        result = CliRunner().invoke(cli, ["diff", str(tk), str(path)])
        assert result.exit_code == 0, result.output
    assert bounds.expansion_limit(os.path.getsize(tk)) > ids.numel() * 8 + 3 * weight.nbytes


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")
def test_sparse_tensors_count_their_stored_values(tmp_path) -> None:
    """A sparse adjacency matrix of 2**20 x 2**20 (4 TiB dense) stores a few values: legitimate."""
    indices = torch.tensor([[0, 5, 2**20 - 1], [1, 7, 3]])
    sparse = torch.sparse_coo_tensor(indices, torch.ones(3), (2**20, 2**20))
    path = tmp_path / "sparse.pt"
    torch.save({"adj": sparse, "csr": sparse.to_sparse_csr()}, path)
    out = torchkeep.load(path)
    assert out["adj"].shape == (2**20, 2**20) and out["adj"]._nnz() == 3


def test_colliding_keys_cost_linear_time(tmp_path) -> None:
    """100,000 keys with one hash took ~60 s to insert (quadratic); refused in well under a
    second. Keys colliding in groups of MAX_HASH_COLLISIONS stay linear and load."""
    from forge import torchkeep_file

    n = 100_000
    flood = tmp_path / "flood.tk"
    flood.write_bytes(torchkeep_file({"$": "set", "v": [k * P for k in range(1, n)]}, {}))
    start = time.perf_counter()
    with pytest.raises(FormatError, match="same hash"):
        torchkeep.load(flood)
    assert time.perf_counter() - start < 5  # quadratic insertion of n keys: about a minute
    group = knobs.MAX_HASH_COLLISIONS
    grouped = tmp_path / "grouped.tk"
    pairs = [[k // group + (k % group + 1) * P, 0] for k in range(n)]
    grouped.write_bytes(torchkeep_file({"$": "dict", "items": pairs}, {}))
    start = time.perf_counter()
    assert len(torchkeep.load(grouped)) == n
    assert time.perf_counter() - start < 10


def test_hash_spread_counts_equal_hashes_not_equal_keys() -> None:
    bounds.check_hash_spread(list(range(10_000)), "x")
    bounds.check_hash_spread([k * P for k in range(knobs.MAX_HASH_COLLISIONS)] + [1, 2], "x")
    with pytest.raises(FormatError, match="x: 65 of its 65 keys"):
        bounds.check_hash_spread([k * P for k in range(65)], "x")
    with pytest.raises(FormatError, match="same hash"):
        bounds.check_hash_spread([(k * P, "a") for k in range(100)], "x")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_every_storable_dtype_round_trips_and_diffs(tmp_path) -> None:
    """The dtype override allow-list is exactly what the writer stores: exotic dtypes load,
    and diff compares the ones torch cannot compare by their bytes instead of crashing."""
    raw = torch.arange(16, dtype=torch.uint8)
    values = {
        "c128": torch.randn(2, dtype=torch.complex128),
        "c32": torch.randn(2, dtype=torch.complex64).to(torch.complex32),
        "e8m0": raw.view(torch.float8_e8m0fnu),
        "u4": raw.view(torch.uint4),
        "f4": raw.view(torch.float4_e2m1fn_x2),
    }
    path = tmp_path / "exotic.tk"
    torchkeep.save(values, path)
    out = torchkeep.load(path)
    for key, value in values.items():
        assert out[key].dtype == value.dtype
        assert torch.equal(out[key].view(torch.uint8), value.view(torch.uint8))
    result = CliRunner().invoke(cli, ["diff", str(path), str(path)])
    assert result.exit_code == 0, result.output
    for bad in (torch.qint8, torch.bits16, torch.bits8):
        with pytest.raises(torchkeep.TorchkeepError):
            torchkeep.save({"x": torch.empty(4, dtype=torch.uint8).view(bad)}, tmp_path / "b.tk")


def test_torch_size_beyond_64_bits_is_refused_on_save(tmp_path) -> None:
    with pytest.raises(torchkeep.TorchkeepError, match="64-bit size"):
        torchkeep.save({"s": torch.Size([2**70])}, tmp_path / "s.tk")
