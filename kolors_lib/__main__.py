"""`python -m kolors_lib ...`"""

import sys

from kolors_lib.cli import main

sys.exit(main())
