#!/usr/bin/env python
"""`fastemd check-data` as a script, e.g. for torchrun: all arguments are those of `fastemd check-data --help`."""

import sys

from fastemd.cli import main

if __name__ == "__main__":
    sys.exit(main(["check-data", *sys.argv[1:]]))
