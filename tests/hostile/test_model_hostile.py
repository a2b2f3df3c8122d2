"""Issue 18 finding 3: whole-model files that name victim classes must run nothing of them.

The victims are ``nn.Module`` subclasses and plain classes of a module the loading process has
already imported (so the "already imported" allow rule resolves them), whose ``__init__``,
``__new__``, ``__setstate__``, ``__del__``, ``__post_init__`` or metaclass open a sentinel file,
allocate or sleep with arguments the file chooses. Each crafted file names them through a
different slot (root and child module classes, constructor arguments for the fit check,
class-valued attributes, configuration objects, nested containers, function references) and
goes through ``load_model`` (defaults, ``check_fit``, ``classes=``) and every CLI command in a
guarded process (audit hook, alarm, memory cap). Anything executed fails the test; a trusted
load of the same files is the positive control that the victims do fire.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from guard import record
from torch import nn

import torchkeep
from torchkeep.model.api import KIND_KEY, KIND_VALUE, MODEL_ENTRY

HERE = os.path.dirname(os.path.abspath(__file__))

VICTIMS = """
import os
import time
from dataclasses import dataclass

from torch import nn

SENTINEL = os.environ["TK_SENTINEL"]


def touch(why, path=None, size=0, delay=0):
    with open(path or SENTINEL, "a") as handle:
        handle.write(why + "\\n")
    bytearray(size)
    time.sleep(delay)


class InitVictim(nn.Module):
    def __init__(self, path=None, size=0, delay=0):
        super().__init__()
        touch("init", path, size, delay)


class NewVictim(nn.Module):
    def __new__(cls, *args, **kwargs):
        touch("new")
        return super().__new__(cls)


class SetstateVictim(nn.Module):
    def __setstate__(self, state):
        touch("setstate")
        super().__setstate__(state)


class DelVictim(nn.Module):
    def __del__(self):
        touch("del")


class GetattributeVictim(nn.Module):
    def __getattribute__(self, name):
        touch("getattribute " + name)
        return super().__getattribute__(name)


class Meta(type):
    def __call__(cls, *args, **kwargs):
        touch("meta call")
        return super().__call__(*args, **kwargs)

    def __getattribute__(cls, name):
        if name not in ("__name__", "__qualname__", "__module__", "__mro__", "__dict__"):
            touch("meta getattribute " + name)
        return super().__getattribute__(name)


class MetaVictim(nn.Module, metaclass=Meta):
    pass


class MetaConfig(metaclass=Meta):
    pass


class ConfigInit:
    def __init__(self, **kwargs):
        touch("config init")


@dataclass
class ConfigPost:
    x: int = 0

    def __post_init__(self):
        touch("post_init")


class ConfigNew:
    def __new__(cls):
        touch("config new")
        return super().__new__(cls)


class ConfigSetstate:
    def __setstate__(self, state):
        touch("config setstate")


class ConfigDel:
    def __del__(self):
        touch("config del")


class ConfigSetattr:
    def __setattr__(self, name, value):
        touch("config setattr")


class ConfigSlots:
    __slots__ = ("a",)


class ConfigDict(dict):
    pass


class MapSetitem(dict):
    def __init__(self, *args, **kwargs):
        touch("map init")

    def __setitem__(self, key, value):
        touch("map setitem")


class MapDel(dict):
    def __del__(self):
        touch("map del")


DEL_INSTANCE = object.__new__(DelVictim)  # reached as "victims:DEL_INSTANCE@type"
"""

RUNNER = """
import gc, json, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import victims  # the victims' module is imported: the "already imported" rule applies
import guarded_load as g
from click.testing import CliRunner
import torchkeep
from torchkeep.cli.main import cli

manifest = json.load(open(sys.argv[3]))
sentinel, scratch = os.environ["TK_SENTINEL"], manifest["scratch"]


def cli_call(args):
    return g._cli(args)


def points(path):
    out = os.path.join(scratch, "out")
    return {
        "load_model": lambda: torchkeep.load_model(path),
        "load_model no fit": lambda: torchkeep.load_model(path, check_fit=False),
        "load_model classes": lambda: torchkeep.load_model(
            path, classes=[victims.InitVictim, victims.ConfigInit, victims.ConfigPost]
        ),
        "cli inspect": cli_call(["inspect", path]),
        "cli inspect --json": cli_call(["inspect", path, "--json"]),
        "cli diff": cli_call(["diff", path, path]),
        "cli convert tk": cli_call(["convert", path, out + ".tk"]),
        "cli convert safetensors": cli_call(["convert", path, out + ".safetensors"]),
    }


def run(path, call, collect=True):
    outcome, typed, message = g.attempt(call)
    if collect:  # a rebuilt victim's __del__ would run here (the CLI rebuilds no classes)
        gc.collect()
    fired = os.path.exists(sentinel)
    if fired:
        os.unlink(sentinel)
    return {"outcome": outcome, "typed": typed, "message": message,
            "events": list(g.events), "fired": fired}


for call in points(manifest["warm"]).values():  # lazy imports before arming
    g.attempt(call)


def hook(event, args):
    # The fit check parses the allowed classes' source (ast.parse raises a "compile" event);
    # parsing runs nothing: running code raises "exec", which stays blocked.
    if event != "compile":
        g.hook(event, args)


sys.addaudithook(hook)
results = []
for case, path in manifest["cases"].items():
    for entry, call in points(path).items():
        result = run(path, call, collect=entry.startswith("load_model"))
        results.append({"case": case, "entry": entry, **result})
        g.events.clear()
for case, path in manifest["controls"].items():
    result = run(path, lambda p=path: torchkeep.load_model(p, trusted=True))
    results.append({"case": case, "entry": "control trusted", **result})
print(json.dumps(results))
"""


def _node(cls: str, **extra) -> dict:
    return {"class": cls, "training": False, "params": {}, "buffers": {}, "modules": {}, **extra}


def _write(path, root: dict, objects: list | None = None) -> str:
    entry = {"version": 2 if objects is not None else 1, "root": root, "extra": {}}
    if objects is not None:
        entry["objects"] = objects
    torchkeep.save({MODEL_ENTRY: entry}, path, metadata={KIND_KEY: KIND_VALUE})
    return str(path)


def _seq(child: dict) -> dict:
    return _node("torch.nn:Sequential", modules={"0": child})


def _value(value: dict, objects: list | None = None) -> tuple[dict, list]:
    return _seq(_node("torch.nn:ReLU", values={"act": value})), objects or []


def _cases(sentinel: str) -> dict[str, tuple[dict, list | None]]:
    """Each case: (root node, object table or None). Victims are named through every slot."""
    bomb = {"path": sentinel, "size": 1 << 40, "delay": 120}
    cases: dict[str, tuple[dict, list | None]] = {
        # the example: the old fit check called cls(**init_args) from the file
        "root init_args": (_node("victims:InitVictim", init_args=bomb), None),
        "child init_args": (_seq(_node("victims:InitVictim", init_args=bomb)), None),
        "root __new__": (_node("victims:NewVictim"), None),
        "child __new__": (_seq(_node("victims:NewVictim")), None),
        "__setstate__": (_seq(_node("victims:SetstateVictim", attrs={"x": 1})), None),
        "__del__": (_seq(_node("victims:DelVictim")), None),
        "metaclass": (_seq(_node("victims:MetaVictim")), None),
        "__getattribute__": (_seq(_node("victims:GetattributeVictim")), None),
        "shared then victim": (
            _node(
                "torch.nn:Sequential",
                modules={"0": _node("victims:NewVictim"), "1": {"shared": "0"}},
            ),
            None,
        ),  # fmt: skip
        "class attr victim module": _value({"class": "victims:InitVictim"}),
        "class attr metaclass": _value({"class": "victims:MetaVictim"}),
        "class attr Popen": _value({"class": "subprocess:Popen"}),
        "class attr os.system": _value({"class": "os:system"}),
        "class attr eval": _value({"class": "builtins:eval"}),
        "class in list": _value({"list": [{"plain": 1}, {"class": "victims:NewVictim"}]}),
        "class in dict": _value({"dict": [["k", {"class": "victims:ConfigNew"}]]}),
        "function victim": _value({"function": "victims:touch"}),
        "partial of victim class": _value(
            {
                "partial": [
                    {"class": "victims:InitVictim"},
                    {"list": []},
                    {"dict": [["path", {"plain": sentinel}], ["size", {"plain": 1 << 40}]]},
                ]
            }
        ),
        "partial of victim function": _value(
            {"partial": [{"function": "victims:touch"}, {"list": []}, {"dict": []}]}
        ),
        "partial of object": _value({"partial": [{"object": 0}, {"list": []}, {"dict": []}]}),
        "functions field": (_seq(_node("torch.nn:ReLU", functions={"f": "victims:touch"})), None),
        "function os.system": _value({"function": "os:system"}),
        "unknown tag": _value({"lambda": "x"}),
        "stateless __setstate__": (_seq(_node("victims:SetstateVictim")), None),
        "stateless __del__": (_seq(_node("victims:DelVictim")), None),
        "value module __new__": _value({"module": _node("victims:NewVictim")}),
        "value module __setstate__": _value({"module": _node("victims:SetstateVictim")}),
        "value module with state": _value(
            {"module": _node("victims:SetstateVictim", attrs={"x": 1})}
        ),
        "@type of __del__ instance": (_seq(_node("victims:DEL_INSTANCE@type")), None),
        "@type of function": _value({"class": "victims:touch@type"}),
        "@type private": _value({"class": "os:_Environ@type"}),
        "@type empty": _value({"class": "victims:@type"}),
        "object out of range": _value({"object": 7}),
    }
    for name in ("ConfigInit", "ConfigPost", "ConfigNew", "ConfigSetstate", "ConfigDel",
                 "ConfigSetattr", "ConfigSlots", "ConfigDict", "MetaConfig"):  # fmt: skip
        table = [{"class": f"victims:{name}", "state": {"a": {"plain": sentinel}}}]
        cases[f"object {name}"] = (_value({"object": 0})[0], table)
    cases["object Popen"] = (
        _value({"object": 0})[0],
        [{"class": "subprocess:Popen", "state": {"args": {"plain": ["touch", sentinel]}}}],
    )
    mappings = {"setitem": "MapSetitem", "__del__": "MapDel", "not a dict": "ConfigInit",
                "builtin dict": "builtins:dict"}  # fmt: skip
    for name, cls in mappings.items():
        ref = cls if ":" in cls else f"victims:{cls}"
        table = [{"class": ref, "state": {}, "items": [["a", {"plain": sentinel}]]}]
        cases[f"mapping {name}"] = (_value({"object": 0})[0], table)
    cases["object nested victim class"] = (
        _value({"object": 0})[0],
        [{"class": "victims:ConfigInit", "state": {"kind": {"class": "victims:NewVictim"}}}],
    )
    cases["object table victim module"] = (
        _node("torch.nn:ReLU"),
        [{"class": "victims:InitVictim", "state": {}}],
    )
    return cases


CONTROLS = (
    "root __new__",
    "__setstate__",
    "__del__",
    "object ConfigDel",
    "mapping __del__",
    "@type of __del__ instance",
)


def test_whole_model_files_run_nothing_of_the_classes_they_name(tmp_path) -> None:
    sentinel = str(tmp_path / "SENTINEL")
    (tmp_path / "victims.py").write_text(VICTIMS)
    (tmp_path / "runner.py").write_text(textwrap.dedent(RUNNER))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    warm = str(scratch / "warm.tk")
    torchkeep.save_model(torchkeep_model(), warm)
    paths = {}
    for i, (case, (root, objects)) in enumerate(_cases(sentinel).items()):
        paths[case] = _write(tmp_path / f"case{i}.tk", root, objects)
    manifest = {
        "scratch": str(scratch),
        "warm": warm,
        "cases": paths,
        "controls": {f"{c} (control)": paths[c] for c in CONTROLS},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    src = os.path.dirname(os.path.dirname(os.path.abspath(torchkeep.__file__)))
    env = {**os.environ, "TK_SENTINEL": sentinel, "PYTHONPATH": src}  # this checkout's code
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path), HERE,
         str(tmp_path / "manifest.json")],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    record("whole-model files", results)
    controls = [r for r in results if r["entry"] == "control trusted"]
    assert controls and all(r["fired"] for r in controls), [
        (r["case"], r["message"]) for r in controls
    ]
    checked = [r for r in results if r["entry"] != "control trusted"]
    assert len(checked) == len(paths) * 8
    ran = [r for r in checked if r["fired"] or r["events"]]
    assert not ran, ran[:5]
    untyped = [r for r in checked if r["outcome"] != "ok" and not r["typed"]]
    assert not untyped, untyped[:5]
    by_case: dict[str, set[str]] = {}
    for r in checked:
        if r["entry"].startswith("load_model"):
            by_case.setdefault(r["case"], set()).add(r["outcome"])
    # Classes that would need their own code to be rebuilt are refused; plain ones load.
    for case in ("root __new__", "__setstate__", "__del__", "metaclass", "class attr Popen",
                 "__getattribute__", "functions field", "partial of victim function",
                 "mapping __del__", "mapping not a dict", "mapping builtin dict",
                 "partial of object",
                 "object ConfigNew", "object ConfigDel", "object ConfigSetstate",
                 "object ConfigSlots", "object ConfigDict", "object MetaConfig",
                 "object Popen", "function victim", "unknown tag", "stateless __del__",
                 "value module __new__", "value module with state", "@type of __del__ instance",
                 "@type of function", "@type private", "@type empty"):  # fmt: skip
        assert "ok" not in by_case[case], (case, by_case[case])
    for case in ("root init_args", "child init_args", "object ConfigInit", "object ConfigPost",
                 "class attr victim module", "stateless __setstate__", "partial of victim class",
                 "mapping setitem",
                 "value module __setstate__"):  # fmt: skip
        assert by_case[case] == {"ok"}, (case, by_case[case])


def torchkeep_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.ReLU())
