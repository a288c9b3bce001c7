"""``python -m fastkd.cli``, as before the CLI became a package (``python -m fastkd`` does the same)."""

import sys

from fastkd.cli import main

sys.exit(main())
