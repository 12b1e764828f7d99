"""``python -m difftilt`` runs the command-line interface."""

from difftilt.core.cli import main

raise SystemExit(main())
