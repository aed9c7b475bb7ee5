"""``python -m insitu``: the ``insitu`` command."""

import sys

from insitu.cli import main

if __name__ == "__main__":
    sys.exit(main())
