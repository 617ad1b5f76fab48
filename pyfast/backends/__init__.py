"""Backend families beside the reference; each module registers its kernels.

Importing this package registers every family's kernels and availability
checks with pyfast.dispatch. Nothing here raises at import: a family that
cannot run reports why through pyfast.backends().
"""
from . import cpp, cuda, triton  # noqa: F401  (registration side effects)
