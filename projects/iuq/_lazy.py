"""PEP 562 lazy names for a package: what needs detectron2 is imported on first use, so that the
package itself imports without it."""
import importlib


def lazy_getattr(package, names):
    """A module ``__getattr__`` for ``package`` resolving each of ``names`` ({name: submodule,
    relative to ``package``}) by importing that submodule on first use."""

    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
