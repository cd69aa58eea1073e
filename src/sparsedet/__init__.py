"""sparsedet: efficient detection transformers on one pure-PyTorch core."""
__version__ = "0.1.0"

from .api import Detector  # noqa: E402
from .config import Config  # noqa: E402
from .errors import SparsedetError  # noqa: E402
from .presets import PRESETS, get_preset  # noqa: E402

__all__ = ["Detector", "Config", "SparsedetError", "PRESETS", "get_preset", "__version__"]
