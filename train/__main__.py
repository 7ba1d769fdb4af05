"""`accelerate launch -m leaplm.train CONFIG [overrides]` / `python -m leaplm.train CONFIG`."""

import sys

from leaplm.cli import main

main(["train", *sys.argv[1:]])
