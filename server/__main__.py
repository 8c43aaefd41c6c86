"""`python -m server serve ...` is the same as `unmask serve ...`."""

import sys

from server.cli import main

sys.exit(main())
