"""Pure tensor merge methods behind one registry.

Importing this package registers every built-in method (``classic``, ``hydraopt`` and
``shared_basis_method`` modules).
"""

from hydraopt.merge import classic, hydraopt, shared_basis_method  # noqa: F401  (registration)
from hydraopt.merge.registry import get_method, list_methods

__all__ = ["get_method", "list_methods"]
