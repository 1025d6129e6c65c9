"""Pure tensor merge methods behind one registry.

Importing this package registers every built-in method (``classic`` and ``hydraopt`` modules).
"""

from hydraopt.merge import classic, hydraopt  # noqa: F401  (registration side effect)
from hydraopt.merge.registry import get_method, list_methods

__all__ = ["get_method", "list_methods"]
