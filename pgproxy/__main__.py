"""`python -m pgproxy`: the same as the `pgproxy` command."""

from pgproxy.cli import main

raise SystemExit(main())
