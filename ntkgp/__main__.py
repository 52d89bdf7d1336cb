"""``python -m ntkgp``: the ``ntkgp`` command (``compare``, ``demo``) where the console script is
not on ``PATH`` (a venv that is not activated, a notebook's ``!python -m ntkgp compare``)."""

import sys

from ntkgp.cli import main

if __name__ == "__main__":
    sys.exit(main())
