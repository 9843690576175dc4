"""``python -m peftkit.cli``: the ``peftkit`` command (as ``python -m peftkit``)."""

import sys

from . import main

sys.exit(main())
