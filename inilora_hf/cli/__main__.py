"""`python -m inilora_hf.cli` runs the console script."""

import sys

from .app import main

sys.exit(main())
