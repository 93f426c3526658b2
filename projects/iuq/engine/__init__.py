"""The detectron2 engine around IUQ's losses.

- ``trainer``: ``IUQTrainer`` (``run_step`` and its loss methods);
- ``hooks``: the peak-memory hook and the dead-mask monitor;
- ``solver``: the base models' grouped optimizers; ``launch``: DDP on a CPU-only machine;
- ``models``: which framework provides which meta-architecture, and the checks against it.

Its names resolve lazily (PEP 562), so that ``import iuq.engine.solver`` (an adapter's) does not
import the trainer.
"""
_NAMES = {
    "IUQTrainer": "trainer",
    "PeakMemory": "hooks",
    "build_grouped_optimizer": "solver",
    "BaseModelUnavailable": "models",
    "register_base_models": "models",
}

__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
