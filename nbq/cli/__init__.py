"""The ``nbq`` command: ``main.py`` builds the parser and dispatches; one module per group of
commands (broker, worker and multi, beat, status/inspect/control, launch)."""
