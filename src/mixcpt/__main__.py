"""`python -m mixcpt ...`: the `mixcpt` command, run by a chosen interpreter."""

from mixcpt.cli import main

raise SystemExit(main())
