"""``python -m fasttune.cli``: the ``fasttune`` command."""

import sys

from fasttune.cli import main

sys.exit(main())
