"""``python -m biodino`` is the ``biodino`` command."""

from biodino.cli.main import main

raise SystemExit(main())
