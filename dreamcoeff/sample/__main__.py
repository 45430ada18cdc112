"""``python -m dreamcoeff.sample``: the sampler's command line (see :mod:`dreamcoeff.sample.cli`)."""

import sys

from .cli import main

sys.exit(main())
