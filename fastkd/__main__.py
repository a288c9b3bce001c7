import sys

from fastkd.cli import main

sys.exit(main())
