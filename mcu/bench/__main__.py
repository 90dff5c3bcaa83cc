"""``python -m mcu.bench``: the same as ``mcu bench``."""

import sys

from mcu.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
