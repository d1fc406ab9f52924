"""`python -m memloc ...` is `memloc ...`: what torchrun starts (`torchrun ... -m memloc train ...`)."""

import sys

from .cli import main

sys.exit(main())
