#!/usr/bin/env python
"""`fastemd export` as a script, e.g. for torchrun: all arguments are those of `fastemd export --help`."""

import sys

from fastemd.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
