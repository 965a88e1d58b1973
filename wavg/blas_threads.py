"""One OpenBLAS thread for the command line; imported by `wavg.cli` before numpy loads.

numpy's bundled OpenBLAS starts a thread per core when numpy is imported, and each spins,
waiting for work, for a while before it sleeps. ``wavg combine`` makes no BLAS call, so on
the two cores it targets that spinning took about 0.1 s of CPU per run from start-up and
the averaging workers (a sixth of all CPU time on ResNet50 checkpoints). A user's own
``OPENBLAS_NUM_THREADS`` wins. The library itself (``import wavg``) changes nothing.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
