"""``python -m peelnb`` runs the ``peelnb`` command."""

import sys

from .cli import main

sys.exit(main())
