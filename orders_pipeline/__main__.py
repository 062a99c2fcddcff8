"""`python -m orders_pipeline`: the same CLI as the `orders-pipeline` console script."""

import sys

from orders_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
