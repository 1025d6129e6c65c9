"""The kinds' fine-tune declarations: what FinetuneConfig and ``hydraopt finetune`` are built from."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest

from hydraopt.cli.finetune import kind_flag_help, kind_flags
from hydraopt.eval.finetune_config import (
    ADAPTER_KINDS,
    FINETUNE_KINDS,
    KIND_FIELDS,
    AdapterKind,
    FinetuneConfig,
)
from hydraopt.kinds.registry import KINDS


def test_every_adapter_kind_declares_its_finetune_part_once():
    assert ADAPTER_KINDS == get_args(AdapterKind) == tuple(FINETUNE_KINDS)
    assert set(FINETUNE_KINDS) == set(KINDS)  # the same kinds as the merge registry's
    for name, kind in FINETUNE_KINDS.items():
        assert kind.display_name == KINDS[name].display_name
        assert issubclass(FinetuneConfig, kind.fields)


def test_kind_fields_are_disjoint_and_hold_their_flags_and_learning_rate():
    seen: set[str] = set()
    for name, kind in FINETUNE_KINDS.items():
        own = set(KIND_FIELDS[name])
        assert not own & seen
        seen |= own
        assert kind.learning_rate in own
        assert {flag.field for flag in kind.flags.values()} <= own


@pytest.mark.parametrize("adapter", ADAPTER_KINDS)
def test_learning_rate_is_the_kinds_own_field(adapter):
    config = FinetuneConfig(adapter=adapter)
    field = FINETUNE_KINDS[adapter].learning_rate
    assert config.learning_rate == getattr(config, field)
    changed = dataclasses.replace(config, **{field: 0.5})
    assert changed.learning_rate == 0.5


def test_a_flag_shared_by_kinds_reads_the_same_type_and_names_each_default():
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    for by_kind in kind_flags().values():
        assert len({type(defaults[flag.field]) for flag in by_kind.values()}) == 1
    rank = kind_flags()["rank"]
    assert kind_flag_help(rank, defaults) == (
        "LoRA rank r, or VeRA's projection dimension r (default 32 for LoRA, 256 for VeRA)"
    )
    assert kind_flag_help(kind_flags()["alpha"], defaults) == "lora_alpha, LoRA only (default 128)"
