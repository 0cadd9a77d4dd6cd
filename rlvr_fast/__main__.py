import sys

from rlvr_fast.cli import main

sys.exit(main())
