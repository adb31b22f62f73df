"""zogy_stream: streaming ZOGY proper image subtraction."""
from .errors import Cancelled, ConfigError, InputError, ProcessingError, ZogyError

__version__ = "0.1.0"
__all__ = ["ZogyError", "InputError", "ConfigError", "ProcessingError", "Cancelled", "__version__"]
