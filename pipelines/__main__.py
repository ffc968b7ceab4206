"""`python -m pipelines STAGE --config FILE ...` (see `pipelines.stages`)."""

import sys

from pipelines.stages import main

if __name__ == "__main__":
    sys.exit(main())
