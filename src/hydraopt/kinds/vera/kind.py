"""The VeRA adapter kind: ΔW = diag(λb) B diag(λd) A with frozen projections shared by all."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hydraopt.errors import HydraoptError
from hydraopt.kinds.base import FinetuneRecipe, GroupMerge
from hydraopt.kinds.vera.bundle import (
    VERA_FROZEN,
    export_vera_adapters,
    load_vera_bundle_from_meta,
    save_vera_bundle,
    vera_bundle_tensors,
    with_vera_tensors,
)
from hydraopt.kinds.vera.check_bundle import check_vera_bundle
from hydraopt.kinds.vera.load import VeraAdapterSet, load_vera_adapter_set
from hydraopt.kinds.vera.traits import VERA_TRAITS
from hydraopt.merge.base import MergeContext, MergeMethod, applied_config
from hydraopt.results import MergedVeraModule, Provenance
from hydraopt.storage import vera_storage_report
from hydraopt.types import ModuleSpec, VeraBundle


class VeraKind:
    """PEFT VeRA adapters (``peft_type: "VERA"``); see :class:`hydraopt.kinds.base.AdapterKind`."""

    name = VERA_TRAITS.name
    display_name = VERA_TRAITS.display_name
    peft_type = VERA_TRAITS.peft_type
    separate_factors = VERA_TRAITS.separate_factors  # its trainable part is the λ vectors
    task_stacked: tuple[str, ...] = ()
    frozen_tensors: tuple[str, ...] = (
        VERA_FROZEN  # shared projections: bit-equal to the training ones, uncounted
    )

    def load_adapter_set(
        self,
        dirs: Sequence[Path],
        tasks: Sequence[str],
        *,
        allow_pickle: bool,
        check_values: bool,
        base_model: str | Path | None,
    ) -> VeraAdapterSet:
        return load_vera_adapter_set(
            dirs, tasks, allow_pickle=allow_pickle, check_values=check_values, base_model=base_model
        )

    def config_class(self, method: MergeMethod) -> type:
        if method.vera_config_class is None:
            raise HydraoptError(f"method {method.name!r} does not merge VERA adapters")
        return method.vera_config_class

    def applied_config(
        self, method: MergeMethod, config: Any, num_tasks: int, device: str
    ) -> dict[str, Any]:
        # A method with a VeRA config of its own (HydraOpt) records it with its VeRA entry point;
        # the others take one config for both kinds.
        own = getattr(method, "applied_vera_config", None)
        if own is None:
            return applied_config(method, config, num_tasks, device=device)
        return dict(own(config, num_tasks))

    def merge_group(
        self,
        method: MergeMethod,
        aset: VeraAdapterSet,
        chunk: Sequence[ModuleSpec],
        config: Any,
        *,
        generator: torch.Generator,
        context: MergeContext,
        device: str,
    ) -> GroupMerge:
        vera = aset.load_stack(chunk).to(device)
        merged = method.merge_vera(vera, config, generator=generator, context=context)
        with torch.no_grad():
            delta = vera.delta()  # (G, K, d, k)
            # Errors in LoRA form (ΔW'_i = heads[route] @ A'), the same measure as for LoRA.
            a, heads = merged.as_lora(vera.A, vera.B)
        return GroupMerge(
            stored=(merged.lambda_b, merged.lambda_d, merged.routing),
            targets=delta,
            lora_a=a,
            lora_heads=heads,
            record_type=MergedVeraModule,
        )

    def build_bundle(
        self,
        aset: VeraAdapterSet,
        method: str,
        config: dict[str, Any],
        merged: dict[str, MergedVeraModule],
        provenance: Provenance,
        bytes_per_param: int,
    ) -> VeraBundle:
        vera_a, vera_b = aset.projections
        rows_b = {name: int(m.lambda_b.shape[0]) for name, m in merged.items()}
        rows_d = {name: int(m.lambda_d.shape[0]) for name, m in merged.items()}
        storage = vera_storage_report(
            aset.modules,
            len(aset.tasks),
            rows_b,
            rows_d,
            vera_a.numel() + vera_b.numel(),
            bytes_per_param,
        )
        return VeraBundle(
            method=method,
            config=config,
            tasks=aset.tasks,
            base_model=aset.base_model,
            modules=aset.modules,
            merged={m.name: merged[m.name] for m in aset.modules},
            projections=aset.projections,
            adapter_configs={info.task: info.config for info in aset.adapters},
            storage=storage,
            provenance=dataclasses.replace(provenance, in_features_source=aset.in_features_source),
        )

    def save_bundle(self, bundle: VeraBundle, out: str | Path, *, dtype: str, force: bool) -> Path:
        return save_vera_bundle(bundle, out, dtype=dtype, force=force)

    def bundle_tensors(self, bundle: Any, dtype: str) -> dict[str, torch.Tensor]:
        return vera_bundle_tensors(bundle, dtype)

    def with_tensors(
        self, bundle: Any, tensors: dict[str, torch.Tensor], quantized: dict[str, Any]
    ) -> Any:
        return with_vera_tensors(bundle, tensors, quantized)

    def load_bundle(self, path: Path, meta: dict[str, Any]) -> VeraBundle:
        return load_vera_bundle_from_meta(path, meta)

    # The kind's checks as they are (signature: AdapterKind.check_bundle_tensors).
    check_bundle_tensors = staticmethod(check_vera_bundle)

    def export_adapters(
        self,
        bundle: VeraBundle,
        out: str | Path,
        *,
        tasks: list[str] | None,
        force: bool,
        dtype: str | None,
    ) -> dict[str, Path]:
        return export_vera_adapters(bundle, out, tasks=tasks, force=force, dtype=dtype)

    def task_weights(self, bundle: VeraBundle, task: str) -> Any:
        """The shared projections and the task's routed (λb, λd) per module: the very numbers
        the bundle's PEFT export holds (its projections are float32 in both)."""
        # Imported here: the in-memory VeRA layers need peft, which merging does not.
        from hydraopt.kinds.vera.apply import VeraWeights

        vera_a, vera_b = bundle.projections
        return VeraWeights(vera_a, vera_b, bundle.task_vectors(task))

    def finetune_recipe(self) -> FinetuneRecipe:
        # Imported here: fine-tuning needs peft and transformers, which merging does not.
        from hydraopt.kinds.vera.finetune import RECIPE

        return RECIPE

    def show_storage(self, aset: VeraAdapterSet) -> list[dict[str, Any]]:
        # Imported here: the report prints through the CLI's tables (rich).
        from hydraopt.kinds.vera.report import show_storage

        return show_storage(aset)

    def show_similarity(
        self, aset: VeraAdapterSet, module_filter: str | None, plot: Path | None
    ) -> dict[str, Any]:
        from hydraopt.kinds.vera.report import show_similarity

        return show_similarity(aset, module_filter, plot)


VERA = VeraKind()
