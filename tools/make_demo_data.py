#!/usr/bin/env python
"""`fastemd make-demo-data` as a script, e.g. for torchrun: all arguments are those of `fastemd make-demo-data --help`."""

import sys

from fastemd.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-demo-data", *sys.argv[1:]]))
