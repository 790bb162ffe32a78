"""``python -m gpntk``: the command line (:mod:`gpntk.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
