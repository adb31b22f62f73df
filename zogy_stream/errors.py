"""Exception hierarchy of zogy_stream.

Every error a user can cause derives from :class:`ZogyError`; the command line
turns these into one line on stderr and a non-zero exit status.
"""

__all__ = ["ZogyError", "InputError", "ConfigError", "ProcessingError", "Cancelled"]


class ZogyError(Exception):
    """Base class of all errors raised by zogy_stream."""


class InputError(ZogyError, ValueError):
    """An input file, array or header is missing, unreadable or inconsistent."""


class ConfigError(ZogyError, ValueError):
    """An option has a value outside its allowed range."""


class ProcessingError(ZogyError, RuntimeError):
    """A computation could not be completed (e.g. a PSF could not be estimated)."""


class Cancelled(ZogyError):
    """Processing was stopped on request (e.g. a daemon shutting down)."""
