import sys

from scratchpath.cli import main

sys.exit(main())
