"""`python -m agents.cli ...` is `longpilot ...` (the background runner and the tests start it so)."""

from agents.cli.main import main

raise SystemExit(main())
