import sys

from aligner.cli import main

sys.exit(main())
