"""Errors that users see as one line: each names the file, chunk or config field at fault."""


class EmscaleError(Exception):
    """Base class: the command line prints these as one line, without a traceback."""


class InputError(EmscaleError):
    """A raw file or store cannot be read, or its content breaks the input contract."""


class StoreError(InputError):
    """A Zarr store does not follow the scan-store or results-store contract."""


class ConfigError(EmscaleError):
    """A configuration value (CLI option or workflow field) is invalid."""


class OutputExistsError(EmscaleError):
    """The output path exists already; emscale never overwrites without being asked."""
