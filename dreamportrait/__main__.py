"""``python -m dreamportrait``: the command line (see :mod:`dreamportrait.cli`)."""
import sys

from .cli import main

sys.exit(main())
