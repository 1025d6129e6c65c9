"""Pure tensor merge methods behind one registry.

Every built-in method is declared here (torch-free: its name, implementing module, config
classes and whether it takes M), so that listing methods and building their CLI flags imports
no torch; the implementing module is imported, and registers the method, on first
:func:`get_method` (see :mod:`hydraopt.merge.registry`). Declaration order is the order of
CLI choices and sweep baselines: the full classic merges, their A-only variants, HydraOpt,
then the two-sided shared basis.
"""

from hydraopt.kinds.vera.config import VeraHydraOptConfig
from hydraopt.merge.classic_config import A_ONLY_METHODS, CLASSIC_METHODS, ClassicConfig
from hydraopt.merge.hydraopt_config import HydraOptConfig
from hydraopt.merge.registry import declare, get_method, list_methods, method_info
from hydraopt.merge.shared_basis_config import SharedBasisConfig

for _name in (*CLASSIC_METHODS, *A_ONLY_METHODS):
    declare(
        _name,
        "hydraopt.merge.classic",
        ClassicConfig,
        vera_config_class=ClassicConfig,
        takes_heads=False,
    )
declare(
    "hydraopt",
    "hydraopt.merge.hydraopt",
    HydraOptConfig,
    vera_config_class=VeraHydraOptConfig,
    takes_heads=True,
)
declare("shared_basis", "hydraopt.merge.shared_basis_method", SharedBasisConfig, takes_heads=False)

__all__ = ["get_method", "list_methods", "method_info"]
