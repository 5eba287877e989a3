"""``python -m emulator`` (and ``python -m mpi4py -m emulator`` under mpiexec)."""

import sys

from emulator.cli import main

sys.exit(main())
