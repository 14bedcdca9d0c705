"""The ``ctrd`` command's entry point, kept apart so it runs before anything imports
structlog.

structlog imports rich whenever it is installed (ctrctl needs it), only to offer
rich tracebacks; the daemon's log formats exceptions as plain text before they
reach the renderer. Kept out, rich costs the daemon nothing: about 3 MiB that every
running container would otherwise share.
"""
from __future__ import annotations

import sys


def main() -> int:
    sys.modules.setdefault("rich", None)  # makes `import rich` fail, as if absent
    from ctrd.daemon.main import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
