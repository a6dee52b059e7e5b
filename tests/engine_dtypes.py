"""The engine's dtype list (cc/engine/dtypes.h, exported as _smallmm_core.dtype_names) as
numpy dtypes, in the engine's order: the kernel tests loop over it, so a dtype added to the
engine is tested the day it is added."""

import ml_dtypes
import numpy as np

from tf_smallmm import _smallmm_core as core


def np_dtype(name):
    """numpy's dtype for an engine dtype name (bfloat16 comes from ml_dtypes)."""
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(getattr(ml_dtypes, name))


NP_DTYPES = [np_dtype(name) for name in core.dtype_names]
