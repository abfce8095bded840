"""``python -m blktx``: the same as the ``blktx`` command."""

import sys

from blktx.cli import main

sys.exit(main())
