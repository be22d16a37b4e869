"""`python -m dxgate` runs the `dxgate` command."""

import sys

from dxgate.main import main

sys.exit(main())
