#!/usr/bin/env python
"""`fastemd profile` as a script, e.g. for torchrun: all arguments are those of `fastemd profile --help`."""

import sys

from fastemd.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
