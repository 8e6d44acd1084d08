"""``python -m rlfuse`` runs the command line."""

import sys

from rlfuse.engine.cli import main

sys.exit(main())
