"""Python side of the CUDA C++ decode kernels (``gka_kernels._C``).

The extension is optional: importing this module never fails. ``extension_available()`` says
whether it was built and imported; ``extension_error()`` says why not.
"""

from __future__ import annotations

from gka_kernels.cuda._loader import extension_available, extension_error, load_extension
from gka_kernels.cuda.state_copy import state_copy

__all__ = ["extension_available", "extension_error", "load_extension", "state_copy"]
