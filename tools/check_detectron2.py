#!/usr/bin/env python
"""Check `fastemd export`'s four detectron2 recipes against a built detectron2 (fastemd/eval/detectron2_check.py):
each config read by detectron2, the exported weights loaded with every backbone value equal, a few
iterations on the demo data. Exit 0: all passed; 1: one failed; 2: no built detectron2 here."""

import sys

from fastemd.eval.detectron2_check import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
