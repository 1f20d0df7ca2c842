#!/usr/bin/env python
"""`fastemd eval` as a script: all arguments are those of `fastemd eval --help` (e.g. `tools/evaluate.py probe BACKBONE --data demo`)."""

import sys

from fastemd.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
