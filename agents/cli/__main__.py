"""`python -m agents.cli ...` is `longpilot ...` (the background runner and the tests start it so)."""

from agents.cli.commands import main

raise SystemExit(main())
