"""``python -m dyadiq.cli``: the same as the ``dyadiq`` command."""

import sys

from dyadiq.cli import main

sys.exit(main())
