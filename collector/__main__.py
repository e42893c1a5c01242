"""`python -m collector`: the `collector` command."""

import gc

gc.disable()  # while collector.cli loads: see collector.cli._importing
from collector.cli import main  # noqa: E402

gc.enable()
try:
    main()
finally:
    # At exit the interpreter collects garbage over every object the imports made (numpy,
    # pyarrow: 15 ms); frozen, they are skipped, and freed with the process.
    gc.freeze()
