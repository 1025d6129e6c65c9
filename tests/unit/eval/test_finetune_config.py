"""Unit tests of the fine-tune settings and of the ``finetune`` flags: no model is loaded."""

from __future__ import annotations

import argparse

import pytest

from hydraopt.cli import finetune as finetune_cli
from hydraopt.eval.finetune_config import FinetuneConfig

# training.json keys of a LoRA run before VeRA existed (examples/adapters/*/training.json): a
# LoRA record must keep exactly these settings, in this order.
LORA_RECORD_KEYS = [
    "r",
    "alpha",
    "dropout",
    "lr",
    "warmup_steps",
    "steps",
    "batch_size",
    "max_len",
    "seed",
    "weight_decay",
    "max_grad_norm",
    "overlong",
    "threads",
    "target_modules",
]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hydraopt")
    finetune_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["finetune", "en-ta", "--out", "x", *argv])


def test_lora_is_the_default_and_its_record_is_unchanged() -> None:
    config = FinetuneConfig()
    assert config.adapter == "lora" and config.learning_rate == config.lr == 2e-4
    record = config.record()
    assert list(record) == LORA_RECORD_KEYS
    assert record["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_vera_defaults_are_peft_defaults_and_its_record_has_only_vera_settings() -> None:
    from peft import VeraConfig

    config = FinetuneConfig(adapter="vera")
    peft_defaults = VeraConfig()
    assert config.vera_r == peft_defaults.r == 256
    assert config.d_initial == peft_defaults.d_initial
    assert config.vera_dropout == peft_defaults.vera_dropout
    assert config.projection_prng_key == peft_defaults.projection_prng_key
    assert config.learning_rate == config.vera_lr != config.lr
    record = config.record()
    assert record["adapter"] == "vera" and record["vera_lr"] == config.vera_lr
    assert not {"r", "alpha", "dropout", "lr"} & record.keys()
    assert {"warmup_steps", "steps", "batch_size", "seed", "target_modules"} <= record.keys()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"adapter": "dora"}, "adapter must be one of"),
        ({"vera_r": 0}, "vera_r must be >= 1"),
        ({"vera_lr": 0.0}, "vera_lr and d_initial must be > 0"),
        ({"d_initial": -0.1}, "vera_lr and d_initial must be > 0"),
        ({"vera_dropout": 1.0}, "vera_dropout must be in [0, 1)"),
        ({"projection_prng_key": -1}, "projection_prng_key must be >= 0"),
        ({"r": 0}, "r must be >= 1"),
    ],
)
def test_config_refuses_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        FinetuneConfig(**changes)


def test_flags_map_to_the_chosen_adapters_fields() -> None:
    lora = finetune_cli.config_from_args(parse("--rank", "8", "--lr", "1e-3", "--alpha", "16"))
    assert (lora.adapter, lora.r, lora.lr, lora.alpha) == ("lora", 8, 1e-3, 16)
    assert lora.vera_r == FinetuneConfig().vera_r  # untouched

    vera = finetune_cli.config_from_args(
        parse("--adapter", "vera", "--rank", "64", "--lr", "4e-3", "--projection-prng-key", "3")
    )
    assert (vera.adapter, vera.vera_r, vera.vera_lr, vera.projection_prng_key) == (
        "vera",
        64,
        4e-3,
        3,
    )
    assert (vera.r, vera.lr) == (FinetuneConfig().r, FinetuneConfig().lr)  # LoRA's untouched

    # No flag: every value is the dataclass default, for either kind.
    assert finetune_cli.config_from_args(parse()) == FinetuneConfig()
    assert finetune_cli.config_from_args(parse("--adapter", "vera")) == FinetuneConfig(
        adapter="vera"
    )


def test_flags_of_the_other_adapter_kind_are_refused() -> None:
    with pytest.raises(ValueError, match="--alpha applies to --adapter lora only, not vera"):
        finetune_cli.config_from_args(parse("--adapter", "vera", "--alpha", "8"))
    with pytest.raises(ValueError, match="--projection-prng-key applies to --adapter vera only"):
        finetune_cli.config_from_args(parse("--projection-prng-key", "1"))
    with pytest.raises(SystemExit):  # argparse's own choices check
        parse("--adapter", "dora")


def test_cli_reports_a_bad_flag_as_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("--adapter", "vera", "--alpha", "8")
    assert finetune_cli.run(args) == 2
    assert "hydraopt finetune: error: --alpha applies" in capsys.readouterr().err
