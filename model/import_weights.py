"""``python -m model.import_weights SOURCE --out CHECKPOINT``: the command of model.importers (see there)."""

import sys

from .importers.cli import main

if __name__ == "__main__":
    sys.exit(main())
