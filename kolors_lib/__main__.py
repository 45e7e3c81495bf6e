"""`python -m kolors_lib ...`"""

import sys


def _main() -> int:
    """Run the CLI; a Python without the course's packages gets one line saying which Python to use."""
    try:
        from kolors_lib.cli import main

        return main()
    except ModuleNotFoundError as err:
        if not err.name or err.name.split(".")[0] == "kolors_lib":
            raise
        print(f"error: {sys.executable} does not have the course's packages (no module named {err.name!r}). "
              "Run `make setup` once in the repository, then `.venv/bin/python -m kolors_lib ...` "
              "(or `source .venv/bin/activate` first).", file=sys.stderr)
        return 2


sys.exit(_main())
