"""``python -m reclip``: the ``reclip`` command, for launchers that start modules (torchrun -m)."""
import sys

from .cli import main

sys.exit(main())
