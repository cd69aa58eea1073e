"""sparsedet: efficient detection transformers on one pure-PyTorch core."""
from .api import Detector
from .config import Config
from .errors import SparsedetError
from .presets import PRESETS, get_preset
from .version import __version__

__all__ = ["Detector", "Config", "SparsedetError", "PRESETS", "get_preset", "__version__"]
