"""Issue 5 hostile pickles: every payload is live (positive control), and every torchkeep entry
point refuses it with a typed error, within a time bound, under a memory cap, running nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from guard import run_guarded
from pickles import write_corpus

import torchkeep
from torchkeep.readers import torch_file

HERE = os.path.dirname(os.path.abspath(__file__))

CONTROL = """
import os, pickle, sys, time, warnings
import torch
warnings.simplefilter("ignore")
sentinel, paths = sys.argv[1], sys.argv[2:]
live = []
for path in paths:
    try:
        if path.endswith(".pkl"):
            pickle.load(open(path, "rb"))
        else:
            torch.load(path, weights_only=False)
    except Exception:
        pass
    for _ in range(100):
        if os.path.exists(sentinel):
            break
        time.sleep(0.05)
    if os.path.exists(sentinel):
        live.append(os.path.basename(path))
        os.unlink(sentinel)
print(" ".join(live))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("pickles")
    sentinel = str(root / "SENTINEL")
    return sentinel, write_corpus(str(root / "corpus"), sentinel)


def test_every_payload_is_live_when_unpickled_unrestricted(corpus) -> None:
    sentinel, paths = corpus
    proc = subprocess.run(
        [sys.executable, "-c", CONTROL, sentinel, *paths.values()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sorted(proc.stdout.split()) == sorted(paths), proc.stderr[-2000:]
    assert len(paths) >= 20


def _run_dir_with(payload_path: str, root: str) -> str:
    run = os.path.join(root, "evil_run")
    step = os.path.join(run, "step-0000000001")
    os.makedirs(step)
    shutil.copy(payload_path, os.path.join(step, "state.tk"))
    with open(os.path.join(step, "meta.json"), "w") as handle:
        json.dump({"step": 1, "time": 0.0, "metrics": {}, "files": []}, handle)
    return run


def test_every_entry_point_refuses_every_payload(corpus, tmp_path) -> None:
    sentinel, paths = corpus
    cases = {name: {"path": path} for name, path in paths.items()}
    cases["run_dir_with_pickled_state"] = {
        "path": _run_dir_with(paths["torch_zip_nested.pt"], str(tmp_path)),
        "run_dir": True,
    }
    for name in ("plain_popen.pkl", "plain_exec.pkl", "torch_zip_nested.pt"):
        cases[f"control {name}"] = {"path": paths[name], "trusted_control": True}
    results = run_guarded(cases, tmp_path, sentinel=sentinel, timeout=900)
    controls = [r for r in results if r["entry"] == "load trusted"]
    assert len(controls) == 3 and all(r["events"] for r in controls), controls
    results = [r for r in results if r["entry"] != "load trusted"]
    listing = {"cli ls"}  # lists steps from meta.json without reading state: nothing to refuse
    bad = [
        r
        for r in results
        if r["events"] or r["sentinel"] or not (r["typed"] or r["entry"] in listing)
    ]
    assert bad == [], json.dumps(bad[:10], indent=1)
    assert not os.path.exists(sentinel)
    assert len(results) >= 14 * len(paths)
    print(f"{len(results)} hostile loads refused across {len(cases)} cases")


def test_weights_only_loader_refuses_when_the_scanner_is_defeated(corpus, monkeypatch) -> None:
    """The second layer on its own: with the static scanner made to report nothing (as a
    payload it cannot parse would), every torch-format payload must still be refused by torch's
    ``weights_only`` unpickler, as an UnsafeFileError naming torch's refusal, running nothing."""
    sentinel, paths = corpus
    calls: list[object] = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch_file, "unsafe_globals", lambda scan: [])  # layer 1 sees nothing
    monkeypatch.setattr(torch, "load", recording_load)
    refused = []
    for name, path in sorted(paths.items()):
        if name.endswith(".pkl"):
            continue  # a bare pickle is not a torch.save file; torch.load never sees it
        before = len(calls)
        with pytest.raises(torchkeep.UnsafeFileError, match=r"\(torch: ") as info:
            torchkeep.load(path)
        assert calls[before:] and all(c is True for c in calls[before:]), (name, calls)
        assert not os.path.exists(sentinel), f"{name}: the payload ran"
        assert name in str(info.value)
        refused.append(name)
    assert len(refused) >= 5, refused
    print(f"weights_only refused {len(refused)} payloads alone: {refused}")
    # Control: with layer 1 back, it refuses first (no torch refusal in the message).
    monkeypatch.undo()
    with pytest.raises(torchkeep.UnsafeFileError) as info:
        torchkeep.load(paths[refused[0]])
    assert "(torch: " not in str(info.value)
