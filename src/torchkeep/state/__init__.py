"""State capture and restore: modules, optimizers, RNG, data loaders."""
