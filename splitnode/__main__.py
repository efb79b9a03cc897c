"""`python -m splitnode`: the `splitnode` command, for an environment without the console script on PATH."""

import sys

from splitnode.cli import main

sys.exit(main())
