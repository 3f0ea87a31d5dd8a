"""LongPilot Gradio app (the app issue builds it on the agents API). Until then it says so and exits non-zero."""

from __future__ import annotations

import sys


def main() -> int:
    print("longpilot app: the Gradio app is not built yet (it depends on the agents issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
