"""The LoRA adapter kind: ΔW = scale · B A per module, merged into a shared A' and M heads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hydraopt.kinds.base import FinetuneRecipe, GroupMerge
from hydraopt.kinds.lora.bundle import (
    export_lora_adapters,
    load_lora_bundle_from_meta,
    lora_bundle_tensors,
    save_lora_bundle,
    with_lora_tensors,
)
from hydraopt.kinds.lora.check_bundle import check_lora_bundle
from hydraopt.kinds.lora.load import AdapterSet, load_lora_adapter_set
from hydraopt.kinds.lora.traits import LORA_TRAITS
from hydraopt.merge.base import MergeContext, MergeMethod, applied_config
from hydraopt.merge.targets import FactorTargets
from hydraopt.results import LoraRecord, Provenance
from hydraopt.storage import records_storage_report
from hydraopt.types import Bundle, ModuleSpec


class LoraKind:
    """PEFT LoRA adapters (``peft_type: "LORA"``); see :class:`hydraopt.kinds.base.AdapterKind`."""

    name = LORA_TRAITS.name
    display_name = LORA_TRAITS.display_name
    peft_type = LORA_TRAITS.peft_type
    separate_factors = LORA_TRAITS.separate_factors
    frozen_tensors: tuple[str, ...] = ()
    # shared_basis cores (K, R, R): R² is rarely a multiple of the group size. HydraOpt heads
    # (M, d, r) are left as they were: d r fills whole groups at every real shape.
    task_stacked: tuple[str, ...] = ("cores",)

    def load_adapter_set(
        self,
        dirs: Sequence[Path],
        tasks: Sequence[str],
        *,
        allow_pickle: bool,
        check_values: bool,
        base_model: str | Path | None,
    ) -> AdapterSet:
        # base_model is a VeRA need (input features); LoRA's A already has them.
        return load_lora_adapter_set(
            dirs, tasks, allow_pickle=allow_pickle, check_values=check_values
        )

    def config_class(self, method: MergeMethod) -> type:
        return method.config_class

    def applied_config(
        self, method: MergeMethod, config: Any, num_tasks: int, device: str
    ) -> dict[str, Any]:
        return applied_config(method, config, num_tasks, device=device)

    def merge_group(
        self,
        method: MergeMethod,
        aset: AdapterSet,
        chunk: Sequence[ModuleSpec],
        config: Any,
        *,
        generator: torch.Generator,
        context: MergeContext,
        device: str,
    ) -> GroupMerge:
        stack = aset.load_stack(chunk).to(device)
        out = method.merge(stack, config, generator=generator, context=context)
        # The updates stay factored: errors are formed a few tasks at a time (memory flat in K).
        return GroupMerge(
            stored=out.stored(),
            targets=FactorTargets(stack.A, stack.scaled_B),
            lora_a=out.A,
            lora_heads=out.heads,
            record_type=out.record_type,
            measured=out.measured,
        )

    def build_bundle(
        self,
        aset: AdapterSet,
        method: str,
        config: dict[str, Any],
        merged: dict[str, LoraRecord],
        provenance: Provenance,
        bytes_per_param: int,
    ) -> Bundle:
        params = sum(m.num_params for m in merged.values())
        return Bundle(
            method=method,
            config=config,
            tasks=aset.tasks,
            base_model=aset.base_model,
            modules=aset.modules,
            merged={m.name: merged[m.name] for m in aset.modules},
            adapter_configs={info.task: info.config for info in aset.adapters},
            scales=aset.scales,
            storage=records_storage_report(aset.modules, len(aset.tasks), params, bytes_per_param),
            provenance=provenance,
        )

    def save_bundle(self, bundle: Bundle, out: str | Path, *, dtype: str, force: bool) -> Path:
        return save_lora_bundle(bundle, out, dtype=dtype, force=force)

    def bundle_tensors(self, bundle: Any, dtype: str) -> dict[str, torch.Tensor]:
        return lora_bundle_tensors(bundle, dtype)

    def with_tensors(
        self, bundle: Any, tensors: dict[str, torch.Tensor], quantized: dict[str, Any]
    ) -> Any:
        return with_lora_tensors(bundle, tensors, quantized)

    def load_bundle(self, path: Path, meta: dict[str, Any]) -> Bundle:
        return load_lora_bundle_from_meta(path, meta)

    # The kind's checks as they are (signature: AdapterKind.check_bundle_tensors).
    check_bundle_tensors = staticmethod(check_lora_bundle)

    def export_adapters(
        self,
        bundle: Bundle,
        out: str | Path,
        *,
        tasks: list[str] | None,
        force: bool,
        dtype: str | None,
    ) -> dict[str, Path]:
        return export_lora_adapters(bundle, out, tasks=tasks, force=force, dtype=dtype)

    def task_weights(self, bundle: Bundle, task: str) -> dict[str, tuple[Any, Any, float]]:
        """``{module: (A', B', 1.0)}``: the bundle's heads already carry the LoRA scale."""
        return {name: (a, b, 1.0) for name, (a, b) in bundle.task_factors(task).items()}

    def finetune_recipe(self) -> FinetuneRecipe:
        # Imported here: fine-tuning needs peft and transformers, which merging does not.
        from hydraopt.kinds.lora.finetune import RECIPE

        return RECIPE

    def show_storage(self, aset: AdapterSet) -> list[dict[str, Any]]:
        # Imported here: the report prints through the CLI's tables (rich).
        from hydraopt.kinds.lora.report import show_storage

        return show_storage(aset)

    def show_similarity(
        self, aset: AdapterSet, module_filter: str | None, plot: Path | None
    ) -> dict[str, Any]:
        from hydraopt.kinds.lora.report import show_similarity

        return show_similarity(aset, module_filter, plot)


LORA = LoraKind()
