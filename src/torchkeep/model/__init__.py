"""Whole models without pickle (save_model/load_model), legacy migration, torch.export artifacts."""

from .api import convert_legacy, load_model, save_model
from .export import export_model, load_exported

__all__ = ["convert_legacy", "export_model", "load_exported", "load_model", "save_model"]
