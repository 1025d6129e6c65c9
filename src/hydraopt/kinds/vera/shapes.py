"""Input and output features of the modules a VeRA adapter targets.

The adapter stores len(λb) = out_features per module but not in_features, which decides the slice
A[:, :k] of the shared projection (and, for unsaved projections, max_in of their regeneration).
In order of preference: the base model's safetensors headers (exact), else the assumption that
every module reads the projection's full width max_in — true for Llama-style attention (q/k/v/o
all read hidden_size), false when an MLP down projection is targeted, which is then refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hydraopt.errors import HydraoptError
from hydraopt.types import AdapterInfo

# Modules whose input is not hidden_size in common decoders (MLP down projections): the
# "k = max_in" assumption is wrong for them, or for the others once they raise max_in.
NOT_HIDDEN_INPUT = ("down_proj", "fc2", "dense_4h_to_h", "w2")


def read_base_shapes(path: str | Path) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every 2-D ``<module>.weight`` in a model dir's safetensors."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise HydraoptError(f"{path}: no *.safetensors weights to read the layer shapes from")
    shapes: dict[str, tuple[int, int]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    shape = f.get_slice(key).get_shape()
                    if key.endswith(".weight") and len(shape) == 2:
                        shapes[key.removesuffix(".weight")] = (int(shape[0]), int(shape[1]))
        except (SafetensorError, OSError) as e:
            raise HydraoptError(f"{file}: cannot read the base model's header ({e})") from e
    return shapes


def find_base_model_dir(name: str) -> Path | None:
    """A local dir holding the base model's weights: ``name`` itself, or its Hugging Face cache."""
    if name and Path(name).is_dir():
        return Path(name)
    if not name:
        return None
    try:
        from huggingface_hub import snapshot_download

        # Cache only: merging never touches the network.
        local = snapshot_download(name, local_files_only=True, allow_patterns=["*.safetensors"])
    except Exception:  # noqa: BLE001 - not cached / not a repo id / hub not installed: no shapes
        return None
    return Path(local) if any(Path(local).glob("*.safetensors")) else None


def module_shapes(
    first: AdapterInfo,
    lengths: Mapping[str, tuple[int, int]],
    saved: tuple[torch.Tensor, torch.Tensor] | None,
    base_model: str | Path | None,
) -> tuple[dict[str, tuple[int, int]], str]:
    """(d, k) per module and where k came from (see module doc)."""
    base_dir = (
        Path(base_model)
        if base_model is not None
        else find_base_model_dir(first.config.get("base_model_name_or_path") or "")
    )
    if base_dir is not None:
        base = read_base_shapes(base_dir)
        out = {}
        for mod, (d, _) in lengths.items():
            if mod not in base:
                raise HydraoptError(f"{base_dir}: the base model has no linear layer {mod}")
            if base[mod][0] != d:
                raise HydraoptError(
                    f"{first.path}: {mod} has len(λb) = {d} but the base model {base_dir} has "
                    f"{base[mod][0]} output features: wrong base model?"
                )
            out[mod] = (d, base[mod][1])
        return out, f"base model {base_dir}"
    down = sorted({m.rsplit(".", 1)[-1] for m in lengths} & set(NOT_HIDDEN_INPUT))
    if down:
        raise HydraoptError(
            f"{first.path}: targets {down}, whose input features differ from the other modules'; "
            "the adapter does not store them: pass the base model dir (--base-model DIR)"
        )
    if saved is not None:
        max_in, max_out = int(saved[0].shape[1]), int(saved[1].shape[0])
    else:
        # Unsaved projections: max_out is exact (the longest λb); max_in is assumed equal to
        # it, as for Llama-style attention where q_proj and o_proj map hidden -> hidden.
        max_out = max(d for d, _ in lengths.values())
        max_in = max_out
    too_long = [m for m, (d, _) in lengths.items() if d > max_out]
    if too_long:
        raise HydraoptError(
            f"{first.path}: {too_long[0]} has len(λb) = {lengths[too_long[0]][0]} > vera_B's "
            f"{max_out} rows; the adapter is inconsistent"
        )
    return {m: (d, max_in) for m, (d, _) in lengths.items()}, "assumed: k = max_in"
