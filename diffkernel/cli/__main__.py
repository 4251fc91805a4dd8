"""``python -m diffkernel.cli``: the ``diffkernel`` command."""

import sys

from . import main

sys.exit(main())
