"""Config values, option values, tensor dtypes and pickles: refused in one line, never cast."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from hydraopt.devices import check_device
from hydraopt.errors import HydraoptError
from hydraopt.io.validate import (
    check_floating,
    check_option_values,
    check_vera_config_values,
    load_pickled_tensors,
)
from hydraopt.kinds.lora.config import check_lora_config, lora_scale
from hydraopt.threads import check_threads

GOOD = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "tiny"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_alpha": "8"}, "lora_alpha must be a finite non-zero number, got '8'"),
        ({"lora_alpha": None}, "lora_alpha must be a finite non-zero number, got None"),
        ({"lora_alpha": math.nan}, "lora_alpha must be a finite non-zero number, got nan"),
        ({"lora_alpha": math.inf}, "lora_alpha must be"),
        ({"lora_alpha": 0}, "lora_alpha must be"),
        ({"lora_alpha": True}, "lora_alpha must be"),
        ({"r": True}, "no valid rank"),
        ({"r": 4.0}, "no valid rank"),
        ({"alpha_pattern": {"q_proj": "x"}}, r"alpha_pattern\['q_proj'\] must be a finite"),
        ({"alpha_pattern": {"q_proj": 0}}, r"alpha_pattern\['q_proj'\] must be a finite"),
        ({"alpha_pattern": ["q_proj"]}, "alpha_pattern must be an object"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern key '\\(' is not a valid regex"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"rank_pattern": {"q_proj": 2.5}}, "must be a positive integer"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
        ({"base_model_name_or_path": 3}, "base_model_name_or_path must be a string"),
    ],
)
def test_bad_lora_config_values_are_refused(change, message):
    with pytest.raises(HydraoptError, match=message) as e:
        check_lora_config({**GOOD, **change}, Path("ad"))
    assert str(e.value).startswith("ad: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("config", [[1, 2], "LORA", None, 3])
def test_a_config_that_is_not_an_object_is_refused(config):
    with pytest.raises(HydraoptError, match="must hold a JSON object"):
        check_lora_config(config, Path("ad"))


def test_good_configs_pass_and_give_peft_scales():
    check_lora_config(GOOD, Path("ad"))
    cfg = {**GOOD, "alpha_pattern": {"q_proj": -16}, "rank_pattern": {"q_proj": 8}}
    check_lora_config(cfg, Path("ad"))  # a negative alpha is legal in PEFT (it negates ΔW)
    assert lora_scale(cfg, "model.layers.0.self_attn.q_proj") == -2.0
    assert lora_scale({k: v for k, v in GOOD.items() if k != "lora_alpha"}, "x.v_proj") == 2.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"projection_prng_key": "0"}, "projection_prng_key must be an integer"),
        ({"save_projection": "true"}, "save_projection must be true or false"),
        ({"r": True}, "no valid rank"),
        ({"base_model_name_or_path": ["x"]}, "must be a string"),
    ],
)
def test_bad_vera_config_values_are_refused(change, message):
    with pytest.raises(HydraoptError, match=message):
        check_vera_config_values({"peft_type": "VERA", "r": 4, **change}, Path("v"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8])
def test_integer_weights_are_refused_not_cast(dtype):
    with pytest.raises(HydraoptError, match="must be floating point"):
        check_floating(torch.zeros(2, dtype=dtype), "w")
    check_floating(torch.zeros(2, dtype=torch.bfloat16), "w")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_malicious_pickle_is_refused_in_one_line_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "adapter_model.bin"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, evil)
    with pytest.raises(HydraoptError, match="refused: not a plain pickle of tensors") as e:
        load_pickled_tensors(evil)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(HydraoptError, match="refused"):
        load_pickled_tensors(raw)
    assert not marker.exists()
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(HydraoptError, match="dict of name -> tensor"):
        load_pickled_tensors(tmp_path / "list.bin")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.bin")
    assert torch.equal(load_pickled_tensors(tmp_path / "ok.bin")["w"], torch.ones(2))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": math.nan}, "lr must be a finite number"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"refine_lr": 0.0}, "refine_lr must be > 0"),
        ({"weights": (1.0, math.nan)}, "weights must be a finite number"),
        ({"density": math.nan}, "density must be a finite number"),
    ],
)
def test_non_finite_or_non_positive_options_are_refused(options, message):
    with pytest.raises(HydraoptError, match=message):
        check_option_values(options)
    check_option_values({"lr": None, "weights": (-1.0, 2.0), "heads": 2})


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("foo", "unknown device 'foo'"),
        ("cuda:x", "unknown device"),
        ("meta", "runs on cpu or cuda, not meta"),
    ],
)
def test_unusable_devices_are_refused(device, message):
    with pytest.raises(HydraoptError, match=message):
        check_device(device)
    check_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(HydraoptError, match="CUDA is not available"):
        check_device("cuda")


@pytest.mark.parametrize("threads", [0, -1, True, 100_000])
def test_thread_counts_must_be_positive_and_runnable(threads):
    with pytest.raises(HydraoptError, match="threads must be a positive integer|more than this"):
        check_threads(threads)
    check_threads(None)
    check_threads(2)
