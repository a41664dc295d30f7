"""emscale: unsupervised phase mapping of large electron-microscopy scans on Dask clusters."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emscale")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from emscale.errors import ConfigError, EmscaleError, InputError, StoreError  # noqa: E402
from emscale.store import (  # noqa: E402
    ChunkPolicy,
    feature_matrix,
    navigation_chunks,
    open_scan,
    validate_scan,
    write_scan,
)

__all__ = [
    "ChunkPolicy",
    "ConfigError",
    "EmscaleError",
    "InputError",
    "StoreError",
    "feature_matrix",
    "navigation_chunks",
    "open_scan",
    "validate_scan",
    "write_scan",
]
