"""``python -m proxy`` is ``ollamon``."""

import sys

from .cli import main

sys.exit(main())
