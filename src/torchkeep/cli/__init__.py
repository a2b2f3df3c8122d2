"""The ``torchkeep`` command line (one module per command; entry point in main.py)."""
