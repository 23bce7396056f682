"""``python -m callcap`` runs the command-line interface."""

from callcap.cli import main

raise SystemExit(main())
