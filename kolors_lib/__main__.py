"""`python -m kolors_lib ...`"""

import importlib.util
import sys

# looked up without importing them (cheap): a Python lacking these is not the course's .venv
_BASICS = ("yaml", "numpy", "PIL")


def _wrong_python(name: str) -> int:
    print(f"error: {sys.executable} does not have the course's packages (no module named {name!r}). "
          "Run `make setup` once in the repository, then `.venv/bin/python -m kolors_lib ...` "
          "(or `source .venv/bin/activate` first).", file=sys.stderr)
    return 2


def _main() -> int:
    """Run the CLI; a Python without the course's packages gets one line saying which Python to use."""
    missing = [name for name in _BASICS if importlib.util.find_spec(name) is None]
    if missing:
        return _wrong_python(missing[0])
    try:
        from kolors_lib.cli.main import main

        return main()
    except ModuleNotFoundError as err:
        if not err.name or err.name.split(".")[0] == "kolors_lib":
            raise
        return _wrong_python(err.name)


sys.exit(_main())
