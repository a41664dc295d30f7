import sys

from emscale.cli import main

sys.exit(main())
