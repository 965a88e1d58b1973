"""``python -m wavg``: the `wavg` command where no console script is on PATH.

It only hands over to `wavg.cli.main`, under the name ``wavg`` (so help, errors and shell
completion's ``_WAVG_COMPLETE`` read as for the console script); it holds no logic.
"""

import sys

from wavg.cli import main

sys.exit(main())
