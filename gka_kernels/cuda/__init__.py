"""Python side of the CUDA C++ decode kernels (``gka_kernels._C``).

The extension is optional: importing this module never fails. ``extension_available()`` says
whether it was built and imported; ``extension_error()`` says why not. The decode functions
validate their inputs on any device and raise a clear error when the extension or CUDA is missing.

- ``gdn_decode``    Gated DeltaNet step (csrc/gdn_decode.cu)
- ``mamba2_decode`` Mamba-2 selective state update (csrc/mamba2_decode.cu)
- ``gka_decode``    Gated KalmaNet step with the Chebyshev solve (csrc/gka_decode.cu)
- ``state_copy``    copy state-pool slots (csrc/state_copy.cu)
"""

from __future__ import annotations

from gka_kernels.cuda._loader import extension_available, extension_error, load_extension
from gka_kernels.cuda.gdn import gdn_decode
from gka_kernels.cuda.gka import gka_decode
from gka_kernels.cuda.mamba2 import mamba2_decode
from gka_kernels.cuda.state_copy import state_copy

__all__ = ["extension_available", "extension_error", "load_extension", "gdn_decode", "gka_decode",
           "mamba2_decode", "state_copy"]
