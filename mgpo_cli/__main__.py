"""``python -m mgpo_cli ...`` is the ``mgpo`` console script."""

import sys

from mgpo_cli.main import main

sys.exit(main())
