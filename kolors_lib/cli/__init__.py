"""The command line: `python -m kolors_lib COMMAND`, one sub-command per course step.
args.py parses without heavy imports (fast --help); main.py dispatches to the steps."""
