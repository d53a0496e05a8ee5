"""``python -m pipelines PIPELINE.yaml [options]``: the same as ``acfrec run``."""

import sys

from acfrec.cli import main

raise SystemExit(main(["run", *sys.argv[1:]]))
