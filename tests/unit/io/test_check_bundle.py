"""Bundles are untrusted input: every inconsistency is refused on load, in one line.

Each case starts from a valid hand-built bundle (tests/bundle_factory.py), breaks one thing in
``bundle.json`` or ``tensors.safetensors`` the way a hostile or careless editor would, and
expects :class:`HydraoptError` naming it — never a traceback, never a silently wrong bundle.
"""

from __future__ import annotations

import math

import pytest
import torch
from bundle_factory import MODULES, edit_meta, edit_tensors, lora_bundle, vera_bundle, write

from hydraopt import export_peft_adapters, load_any_bundle, load_bundle
from hydraopt.errors import HydraoptError

Q, KP = MODULES[0].name, MODULES[1].name


def setitem(key, value):
    return lambda meta: meta.__setitem__(key, value)


def delitem(key):
    return lambda meta: meta.pop(key)


def routing(module, value):
    return lambda meta: meta["routing"].__setitem__(module, value)


def module_field(i, key, value):
    return lambda meta: meta["modules"][i].__setitem__(key, value)


def scale(task, module, value):
    return lambda meta: meta["scales"][task].__setitem__(module, value)


META_CASES = {
    "version is a string": (setitem("format_version", "1"), "format_version"),
    "version is a float": (setitem("format_version", 1.5), "format_version"),
    "version is a bool": (setitem("format_version", True), "format_version"),
    "version is null": (setitem("format_version", None), "format_version"),
    "version is zero": (setitem("format_version", 0), "format_version"),
    "kind is a number": (setitem("adapter_kind", 3), "adapter_kind"),
    "kind is unknown": (setitem("adapter_kind", "dora"), "adapter_kind"),
    "task escapes": (setitem("tasks", ["../escaped", "beta", "gamma"]), "task name"),
    "task is absolute": (setitem("tasks", ["/tmp/x", "beta", "gamma"]), "task name"),
    "task is empty": (setitem("tasks", ["", "beta", "gamma"]), "task name"),
    "task has a newline": (setitem("tasks", ["a\nb", "beta", "gamma"]), "task name"),
    "task repeats": (setitem("tasks", ["beta", "beta", "gamma"]), "twice"),
    "tasks not a list": (setitem("tasks", "alpha"), "'tasks' must be a list, found a string"),
    "no tasks": (setitem("tasks", []), "no tasks"),
    "negative route": (routing(Q, [-1, 0, 1]), "holds -1"),
    "route out of range": (routing(Q, [0, 2, 1]), "holds 2"),
    "route too short": (routing(Q, [0, 1]), "one head per task"),
    "route too long": (routing(Q, [0, 1, 1, 0]), "one head per task"),
    "route is a float": (routing(Q, [0, 1.0, 1]), "holds 1.0"),
    "route is a bool": (routing(Q, [0, True, 1]), "holds True"),
    "route is a string": (routing(Q, [0, "1", 1]), "holds '1'"),
    "route missing": (lambda m: m["routing"].pop(Q), "routing of"),
    "routing not an object": (setitem("routing", [[0, 1, 1]]), "'routing' must be an object"),
    "module without name": (module_field(0, "name", None), "needs a name"),
    "module d is a string": (module_field(0, "d", "4"), "d must be an integer"),
    "module heads zero": (module_field(0, "heads", 0), "heads must be an integer"),
    "module r negative": (module_field(1, "r", -2), "r must be an integer"),
    "module listed twice": (lambda m: m["modules"].append(dict(m["modules"][0])), "twice"),
    "no modules": (setitem("modules", []), "no modules"),
    "module d disagrees": (module_field(0, "d", 5), "shape"),
    "module heads disagree": (module_field(0, "heads", 3), "shape"),
    "unknown module": (module_field(1, "name", "layers.9.v"), "routing of"),
    "scale zero": (scale("alpha", Q, 0), "finite non-zero"),
    "scale NaN": (scale("alpha", Q, math.nan), "finite non-zero"),
    "scale Inf": (scale("alpha", Q, math.inf), "finite non-zero"),
    "scale string": (scale("alpha", Q, "2"), "finite non-zero"),
    "scale null": (scale("alpha", Q, None), "finite non-zero"),
    "scale missing": (lambda m: m["scales"]["beta"].pop(KP), "finite non-zero"),
    "scales of a task missing": (lambda m: m["scales"].pop("gamma"), "scales has no object"),
    "method not a string": (setitem("method", 3), "'method' must be a string"),
    "config not an object": (setitem("config", [1]), "'config' must be an object"),
    "base model not a string": (
        setitem("base_model", 5),
        "'base_model' must be a string, found an integer",
    ),
    "config of a task missing": (lambda m: m["adapter_configs"].pop("beta"), "adapter_configs"),
    "dtype unknown": (setitem("dtype", "int8"), "dtype must be one of"),
    "extra not an object": (setitem("extra", []), "'extra' must be an object"),
    "storage missing": (delitem("storage"), "'storage' must be an object, found missing"),
    "storage number missing": (lambda m: m["storage"].pop("bundle_bytes"), "storage.bundle_bytes"),
    "storage percent a string": (
        lambda m: m["storage"].__setitem__("storage_percent", "50"),
        "storage.storage_percent must be a finite number",
    ),
    "merge seconds a string": (
        lambda m: m["extra"].__setitem__("merge_seconds", "fast"),
        "extra.merge_seconds must be a number",
    ),
    "errors too short": (
        lambda m: m["extra"].__setitem__("errors", {Q: [0.1]}),
        "extra.errors must map each module to one number per task",
    ),
    "errors not numbers": (
        lambda m: m["extra"].__setitem__("zero_errors", {Q: ["a", "b", "c"]}),
        "extra.zero_errors must map",
    ),
    "sources not paths": (
        lambda m: m["extra"].__setitem__("sources", {"alpha": 3}),
        "extra.sources must map",
    ),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_every_metadata_defect_is_refused_in_one_line(case, tmp_path):
    path = write(lora_bundle(), tmp_path / "b")
    change, message = META_CASES[case]
    edit_meta(path, change)
    with pytest.raises(HydraoptError, match=message) as e:
        load_any_bundle(path)
    assert "\n" not in str(e.value)


def drop(key):
    return lambda t: t.pop(key)


def put(key, value):
    return lambda t: t.__setitem__(key, value)


TENSOR_CASES = {
    "A missing": (drop(f"{Q}.A"), "no tensor"),
    "heads missing": (drop(f"{KP}.heads"), "no tensor"),
    "heads NaN": (put(f"{Q}.heads", torch.full((2, 4, 2), math.nan)), "NaN or Inf"),
    "A Inf": (put(f"{Q}.A", torch.full((2, 3), math.inf)), "NaN or Inf"),
    "A wrong shape": (put(f"{Q}.A", torch.zeros(3, 2)), "shape"),
    "heads integer": (put(f"{Q}.heads", torch.zeros(2, 4, 2, dtype=torch.int64)), "floating"),
    "heads bool": (put(f"{Q}.heads", torch.zeros(2, 4, 2, dtype=torch.bool)), "floating"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_every_tensor_defect_is_refused(case, tmp_path):
    path = write(lora_bundle(), tmp_path / "b")
    change, message = TENSOR_CASES[case]
    edit_tensors(path, change)
    with pytest.raises(HydraoptError, match=message):
        load_bundle(path)


def test_a_valid_bundle_still_loads_and_exports(tmp_path):
    path = write(lora_bundle(), tmp_path / "b")
    bundle = load_bundle(path)
    assert bundle.tasks == ("alpha", "beta", "gamma")
    assert export_peft_adapters(bundle, tmp_path / "out").keys() == {"alpha", "beta", "gamma"}


def test_export_of_an_escaping_bundle_writes_nothing_anywhere(tmp_path):
    path = write(lora_bundle(), tmp_path / "r" / "b")
    edit_meta(path, setitem("tasks", ["../escaped", "beta", "gamma"]))
    with pytest.raises(HydraoptError, match="task name"):
        export_peft_adapters(load_any_bundle(path), tmp_path / "r" / "x" / "out")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["b"]


def test_an_in_memory_bundle_with_an_unsafe_name_is_not_exported(tmp_path):
    import dataclasses

    bundle = dataclasses.replace(lora_bundle(), tasks=("alpha", "/abs", "gamma"))
    with pytest.raises(HydraoptError, match="path separators"):
        export_peft_adapters(bundle, tmp_path / "out")
    with pytest.raises(HydraoptError, match="not in the bundle"):
        export_peft_adapters(lora_bundle(), tmp_path / "out", tasks=["../x"])
    assert list(tmp_path.iterdir()) == []


VERA_CASES = {
    "projection missing": (drop("vera_A"), "'vera_A' must be a matrix"),
    "projection rank": (put("vera_B", torch.zeros(4, 3)), "'vera_B' must be a matrix of rank 2"),
    "projection too small": (put("vera_A", torch.zeros(2, 2)), "larger than the projections"),
    "projection NaN": (put("vera_B", torch.full((4, 2), math.nan)), "NaN or Inf"),
    "lambda_b missing": (drop(f"{Q}.lambda_b"), "lambda_b must have"),
    "lambda_d wrong length": (put(f"{Q}.lambda_d", torch.zeros(1, 3)), "shape"),
    "lambda rows disagree": (put(f"{Q}.lambda_b", torch.zeros(3, 4)), "lambda_b must have 2"),
    "lambda integer": (put(f"{KP}.lambda_d", torch.zeros(1, 2, dtype=torch.int32)), "floating"),
}


@pytest.mark.parametrize("case", list(VERA_CASES))
def test_every_vera_tensor_defect_is_refused(case, tmp_path):
    path = write(vera_bundle(), tmp_path / "v")
    assert load_any_bundle(path).tasks == ("alpha", "beta", "gamma")
    change, message = VERA_CASES[case]
    edit_tensors(path, change)
    with pytest.raises(HydraoptError, match=message):
        load_any_bundle(path)


def test_vera_routing_and_row_counts_are_checked(tmp_path):
    path = write(vera_bundle(), tmp_path / "v")
    edit_meta(path, routing(Q, [0, 2, 1]))
    with pytest.raises(HydraoptError, match="holds 2"):
        load_any_bundle(path)
    path = write(vera_bundle(), tmp_path / "w")
    edit_meta(path, module_field(0, "lambda_d_rows", 2))
    with pytest.raises(HydraoptError, match="lambda_d must have 2"):
        load_any_bundle(path)
    path = write(vera_bundle(), tmp_path / "x")
    edit_tensors(path, put(f"{Q}.lambda_d", torch.zeros(2, 2)))
    edit_meta(path, module_field(0, "lambda_d_rows", 2))
    with pytest.raises(HydraoptError, match="one of lambda_b/lambda_d must have one row"):
        load_any_bundle(path)
