"""emscale: unsupervised phase mapping of large electron-microscopy scans on Dask clusters.

The names below are imported on first use (PEP 562): ``import emscale`` and ``emscale --help``
do not load dask, xarray and zarr.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emscale")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_WHERE = {
    "ConfigError": "emscale.errors",
    "EmscaleError": "emscale.errors",
    "InputError": "emscale.errors",
    "StoreError": "emscale.errors",
    "ChunkPolicy": "emscale.store",
    "feature_matrix": "emscale.store",
    "navigation_chunks": "emscale.store",
    "open_scan": "emscale.store",
    "validate_scan": "emscale.store",
    "write_scan": "emscale.store",
    "open_results": "emscale.results",
    "ResultsStore": "emscale.results",
    "export_results": "emscale.export",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emscale' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])
