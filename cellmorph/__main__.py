import sys

from cellmorph.cli import main

sys.exit(main())
