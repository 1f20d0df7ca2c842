#!/usr/bin/env python
"""`fastemd train` as a script, e.g. for torchrun (`torchrun --nproc_per_node=8 tools/train.py --preset coco_800ep`): all arguments are those of `fastemd train --help`."""

import sys

from fastemd.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
