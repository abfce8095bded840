"""``python -m blktx``: the same as the ``blktx`` command.

``python -m`` puts the current folder first on ``sys.path``; blktx runs as root in
folders others may write, so that entry goes before any plugin is looked up
(a ``*.dist-info`` folder there would otherwise register an entry point).
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()) and not os.path.isfile(os.path.join(sys.path[0] or ".", "blktx", "__main__.py")):
    del sys.path[0]

from blktx.cli import entry

sys.exit(entry())
