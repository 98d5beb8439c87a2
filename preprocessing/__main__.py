"""``python -m preprocessing STAGE ...`` (the same stages as ``monai-fl prep``)."""

import sys

from preprocessing.cli import main

if __name__ == "__main__":
    sys.exit(main())
