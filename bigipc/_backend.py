"""Choose the core implementation. Every other module imports it from here.

``BIGIPC_PUREPYTHON=1`` forces the pure-Python core. Otherwise the compiled
``bigipc._core`` is used, and when it is missing (an install without a C
compiler) the pure core is used with a ``RuntimeWarning``.
"""

import os
import warnings
from typing import TYPE_CHECKING

__all__ = [
    "IMPLEMENTATION",
    "LONG_HEADER",
    "MAX_PARTS",
    "MAX_SHORT_LENGTH",
    "MULTIPART_HEADER",
    "Channel",
    "QueueEnds",
]

IMPLEMENTATION: str

if TYPE_CHECKING:
    # Type checkers see the interface both cores implement: the stub
    # bigipc/_core.pyi.
    from bigipc._core import LONG_HEADER, MAX_PARTS, MAX_SHORT_LENGTH, MULTIPART_HEADER, Channel, QueueEnds
else:
    if os.environ.get("BIGIPC_PUREPYTHON", "") not in ("", "0"):
        from bigipc import _purecore as _chosen

        IMPLEMENTATION = "python"
    else:
        try:
            from bigipc import _core as _chosen
        except ImportError as exc:
            warnings.warn(
                "bigipc: the compiled core is not available (%s); using the slower pure-Python core" % (exc,),
                RuntimeWarning,
                stacklevel=2,
            )
            from bigipc import _purecore as _chosen

            IMPLEMENTATION = "python"
        else:
            IMPLEMENTATION = "cython"
    # Every name of __all__ but IMPLEMENTATION comes from the chosen core.
    globals().update((name, getattr(_chosen, name)) for name in __all__[1:])
