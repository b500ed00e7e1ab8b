"""`python -m warmer`: the same as the `warmer` command."""

from warmer.cli import main

raise SystemExit(main())
