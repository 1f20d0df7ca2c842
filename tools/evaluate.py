#!/usr/bin/env python
"""`fastemd eval` as a script: all arguments are those of `fastemd eval --help` (e.g. `tools/evaluate.py probe BACKBONE --data demo`,
or under torchrun `torchrun --nproc_per_node=8 tools/evaluate.py detect BACKBONE --schedule 1x --train ... --val ...`)."""

import sys

from fastemd.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
