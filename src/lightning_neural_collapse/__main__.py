"""``python -m lightning_neural_collapse report LOGDIR ... --out FILE``: see :mod:`lightning_neural_collapse.cli`."""

import sys

from lightning_neural_collapse.cli import main

sys.exit(main())
