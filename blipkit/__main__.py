import sys

from blipkit.cli import main

sys.exit(main())
