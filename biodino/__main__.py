"""``python -m biodino`` is the ``biodino`` command."""

from biodino.train.cli import main

raise SystemExit(main())
