"""``python -m acfrec``: the same as the ``acfrec`` command."""

from acfrec.cli import main

raise SystemExit(main())
