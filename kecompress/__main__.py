"""``python -m kecompress``: the same as the ``kecompress`` command."""

import sys

from .cli import main

sys.exit(main())
