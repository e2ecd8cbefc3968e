"""``python -m blipkit.train stage1|stage2 --config FILE --out DIR [--resume]``; works under torchrun."""

import sys

from blipkit.train.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
