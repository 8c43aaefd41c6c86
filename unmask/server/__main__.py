"""`python -m unmask.server serve ...` is the same as `unmask serve ...`."""

import sys

from unmask.server.cli import main

sys.exit(main())
