"""`python -m worker [run|check|enqueue|stats]`: the only place that reads `os.environ`."""

import os
import sys

from worker.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
