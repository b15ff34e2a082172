"""``python -m dsnn_compress`` runs the CLI (also usable under ``torchrun -m dsnn_compress``)."""

import sys

from .cli import main

sys.exit(main())
