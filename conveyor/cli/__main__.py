"""`python -m conveyor.cli`: the same entry point as the `conveyor` script."""
import sys

from conveyor.cli import main

sys.exit(main())
