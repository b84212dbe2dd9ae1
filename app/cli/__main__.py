"""`python -m app.cli` = the `kto-loop` console script."""

import sys

from app.cli import main

sys.exit(main())
