"""``python -m flexmask``: the command line, :func:`flexmask.tools.cli.main`."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
