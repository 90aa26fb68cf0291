"""``python -m spannorm``: the spannorm command (torchrun starts its processes this way: ``torchrun ... -m
spannorm train ...``)."""

import sys

from .cli import main

sys.exit(main())
