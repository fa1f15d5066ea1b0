"""`python -m p2pmodel.cli` runs the command line, like the `p2pmodel` script."""

import sys

from p2pmodel.cli import main

sys.exit(main())
