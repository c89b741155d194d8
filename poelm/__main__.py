"""``python -m poelm`` (and ``torchrun -m poelm``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
