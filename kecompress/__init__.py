"""kecompress: Knowledge Evolution for PyTorch, and the slim network it leaves behind."""

from .errors import KecompressError
from .split import Split, split

__all__ = ["KecompressError", "Split", "split"]
__version__ = "0.1.0"
