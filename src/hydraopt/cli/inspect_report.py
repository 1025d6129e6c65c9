"""What ``hydraopt inspect`` shows of a bundle: storage, routing, errors (and R per module).

Apart from :mod:`hydraopt.cli.inspect` (the parser), which imports this module only when the
command runs: it needs torch, and ``hydraopt inspect --help`` should not wait for it. What is
shown of adapters is the kind's (``show_storage`` / ``show_similarity``).
"""

from __future__ import annotations

from hydraopt.analysis import error_by_task
from hydraopt.cli.display import print_table
from hydraopt.cli.merge import module_ranks, print_summary
from hydraopt.types import Bundle, VeraBundle


def show_bundle(bundle: Bundle | VeraBundle, top: int) -> dict:
    print_summary(bundle)
    errors = bundle.provenance.errors
    dist = bundle.provenance.error_distance
    worst = sorted(errors.items(), key=lambda kv: -sum(kv[1]) / len(kv[1]))[:top]
    rows = []
    for name, errs in worst:
        routing = bundle.merged[name].routing.tolist()
        rows.append([name, sum(errs) / len(errs), max(errs), " ".join(map(str, routing))])
    print_table(
        f"worst {len(rows)} modules ({dist}); routing = head per task {list(bundle.tasks)}",
        ["module", f"mean {dist}", f"max {dist}", "routing"],
        rows,
    )
    return {
        "method": bundle.method,
        "config": bundle.config,
        "storage": bundle.storage.to_dict(),
        "error_by_task": error_by_task(bundle),
        "errors": errors,
        "routing": {n: m.routing.tolist() for n, m in bundle.merged.items()},
        **({"ranks": ranks} if (ranks := module_ranks(bundle)) else {}),
    }
