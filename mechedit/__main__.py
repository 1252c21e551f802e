"""``python -m mechedit ...``: see ``mechedit.cli``."""

import sys

from mechedit.cli import main

sys.exit(main())
