"""The detectron2 engine around IUQ's losses.

- ``trainer``: ``IUQTrainer`` (``run_step`` and its loss methods);
- ``hooks``: the peak-memory hook and the dead-mask monitor;
- ``solver``: the base models' grouped optimizers; ``launch``: DDP on a CPU-only machine;
- ``models``: which framework provides which meta-architecture, and the checks against it.

Its names resolve lazily (PEP 562), so that ``import iuq.engine.solver`` (an adapter's) does not
import the trainer.
"""
from .._lazy import lazy_getattr

_NAMES = {
    "IUQTrainer": "trainer",
    "PeakMemory": "hooks",
    "build_grouped_optimizer": "solver",
    "BaseModelUnavailable": "models",
    "register_base_models": "models",
}

__all__ = list(_NAMES)


__getattr__ = lazy_getattr(__name__, _NAMES)
