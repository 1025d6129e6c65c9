"""Run the merge's module groups as Ray tasks (``--engine ray``): past one machine.

Modules share no parameters, so a merge of thousands of adapters or of a 70B model shards by
module group. Each task opens the adapter files itself (``safe_open`` on the paths in the
AdapterSet, so they must be visible to every node, e.g. a shared filesystem) and returns only the
merged tensors; the driver assembles and writes the bundle. Chunking and per-chunk seeds are the
local engine's, so the bundle is the same as a local run with the same thread count.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from hydraopt.engine_chunks import merge_chunk, plan_chunks
from hydraopt.errors import HydraoptError


def iter_merged_ray(
    aset: Any,
    method_name: str,
    config: Any,
    options: Any,
    configs: Mapping[str, Any] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (modules in chunk, chunk result) as Ray tasks finish.

    Args:
        options: :class:`hydraopt.engine.EngineOptions`; ``address`` selects the cluster
            (``None`` starts a local Ray instance with ``ray_cpus`` CPUs).
        configs: module name -> its config where the method planned one per module (as
            :func:`hydraopt.engine_chunks.iter_merged`).
    """
    try:
        import ray
    except ImportError as e:
        raise HydraoptError("the Ray engine needs Ray: pip install 'hydraopt[scale]'") from e

    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if options.address:
            kwargs["address"] = options.address
        else:
            kwargs["num_cpus"] = options.ray_cpus
        try:
            ray.init(**kwargs)
        except ConnectionError as e:
            raise HydraoptError(f"cannot reach the Ray cluster at {options.address}: {e}") from e
        started_here = True
    try:
        # One CPU per task: each task is a batched tensor job that sets its own torch threads.
        remote = ray.remote(num_cpus=1)(_merge_chunk_task)
        chunks = plan_chunks(aset.modules, len(aset.tasks), options.chunk_elements, configs)
        aset_ref = ray.put(aset)
        pending = {
            remote.remote(
                aset_ref,
                chunk,
                method_name,
                config if configs is None else configs[chunk[0].name],
                options,
            ): len(chunk)
            for chunk in chunks
        }
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)
    finally:
        if started_here:
            ray.shutdown()


def _merge_chunk_task(aset: Any, chunk, method_name: str, config: Any, options: Any):
    import torch

    torch.set_num_threads(options.ray_threads)
    return merge_chunk(aset, chunk, method_name, config, options)
