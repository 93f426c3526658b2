"""Adapters: how IUQ reaches into each base model's training forward (one file per model)."""
from .base import IUQ_ADAPTER_REGISTRY, Captured, IUQAdapter, adapter_class, build_adapter, adapter_class_or_none

__all__ = ["IUQ_ADAPTER_REGISTRY", "Captured", "IUQAdapter", "adapter_class", "build_adapter", "adapter_class_or_none"]
