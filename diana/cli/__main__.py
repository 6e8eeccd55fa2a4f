"""``python -m diana.cli``: how `diana run` and the tests start each pipeline process."""

import sys

from diana.cli import main

sys.exit(main())
