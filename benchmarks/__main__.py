"""`python -m benchmarks`: the same command as the `orders-pipeline-benchmark` console script."""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
