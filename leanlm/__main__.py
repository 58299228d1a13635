"""`python -m leanlm ...` (also what `torchrun -m leanlm ...` runs)."""
import sys

from leanlm.cli import main

sys.exit(main())
