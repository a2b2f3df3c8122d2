"""Framework integrations: Lightning, Hugging Face ``Trainer`` and Accelerate.

Each submodule imports its framework, so import the one you use
(``torchkeep.integrations.lightning``, ``.transformers``, ``.accelerate``); this package itself
imports nothing, and ``import torchkeep`` never imports a framework.
"""
