"""``python -m etfkern``: see :mod:`etfkern.cli`."""
import sys

from etfkern.cli import main

sys.exit(main())
