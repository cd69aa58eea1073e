"""``python -m sparsedet``: the command line (what torchrun launches: ``torchrun ... -m sparsedet train``)."""
import sys

from .cli import main

sys.exit(main())
