"""``python -m taca``: the same command as the ``taca`` console script."""
import sys

from .cli import main

sys.exit(main())
