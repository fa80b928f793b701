"""``python -m proxy`` is ``ollamon``."""

import sys

from proxy.cli.main import main

sys.exit(main())
