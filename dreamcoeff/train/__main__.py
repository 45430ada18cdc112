"""`python -m dreamcoeff.train ...`: the same trainer as `train_dreambooth_coeff.py`."""

import sys

from .cli import main

sys.exit(main())
