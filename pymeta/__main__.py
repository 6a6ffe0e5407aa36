import sys

from pymeta.cli import main

sys.exit(main())
