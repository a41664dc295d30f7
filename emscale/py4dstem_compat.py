"""The one place that imports py4DSTEM.

py4DSTEM releases after 0.14.14 cap numpy < 2, so pip installs 0.14.14 next to numpy 2, and that
release still uses names numpy 2 removed. We restore those aliases (module attributes only; numpy's
behaviour is unchanged) before importing it. emscale reads py4DSTEM files itself, lazily, with h5py
(``emscale.readers.read_emd1``): py4DSTEM's reader loads the whole file into memory.
"""

from __future__ import annotations

import numpy as np

from emscale.errors import InputError

_NUMPY2_REMOVED = {
    "infty": np.inf,
    "Inf": np.inf,
    "NaN": np.nan,
    "float_": np.float64,
    "complex_": np.complex128,
    "string_": np.bytes_,
    "unicode_": np.str_,
}


def import_py4dstem():
    """Import py4DSTEM with numpy-2 compatibility aliases; InputError if it is not installed."""
    for name, value in _NUMPY2_REMOVED.items():
        if name not in np.__dict__:
            setattr(np, name, value)
    try:
        import py4DSTEM
    except ImportError as exc:
        raise InputError(f"py4DSTEM is not installed ({exc}); pip install 'emscale[py4dstem]'") from None
    return py4DSTEM
