"""`python -m hydraserve.cli`: what workers and daemons are started with."""

import sys

from hydraserve.cli import main

sys.exit(main())
