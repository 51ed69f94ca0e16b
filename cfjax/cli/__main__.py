"""``python -m cfjax.cli ...``: the same as the ``cfjax`` command."""

import sys

from cfjax.cli import main

sys.exit(main())
