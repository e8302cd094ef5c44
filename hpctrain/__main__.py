"""``python -m hpctrain``: the ``hpctrain`` command."""

from .cli import main

raise SystemExit(main())
