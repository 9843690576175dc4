"""``python -m peftkit``: the ``peftkit`` command."""

import sys

from .cli import main

sys.exit(main())
