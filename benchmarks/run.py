"""Dynamic vs static convolution benchmark; the same as ``dyconv bench`` (see ``--help``)."""

import sys

from dyconv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
