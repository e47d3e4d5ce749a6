"""Allow ``python -m masksup_med`` as an alias of the ``masksup-med`` command."""

import sys

from masksup_med.cli import main

sys.exit(main())
