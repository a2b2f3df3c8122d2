"""``python -m torchkeep``: the command-line interface (same as the ``torchkeep`` script)."""

from .cli.main import main

if __name__ == "__main__":
    main()
