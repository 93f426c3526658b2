"""The package's layout: its module graph has no import circle, the framework-independent core
(``iuq.inter``, ``iuq.equi`` but its detectron2 views) imports no detectron2 or base framework,
``import iuq`` pulls none in, and every module imports where its frameworks are installed.

The graph is read statically from every ``import`` statement of every module, those inside
functions included (a circle closed by a function-level import fails only when that function
runs, which is what made it easy to introduce)."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "projects" / "iuq"
# Core: torch only. ``iuq.equi.views`` builds detectron2 ``Instances`` for a batch's views.
CORE = ("iuq.inter", "iuq.equi")
CORE_EXCEPTIONS = ("iuq.equi.views",)
FRAMEWORKS = ("detectron2", "adet", "mask2former", "sparseinst", "solq", "panopticapi", "fvcore", "lvis")


def module_files():
    """{dotted module name: path} for every module of the package (``pkg`` for ``pkg/__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("iuq",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def imports_of(name, path):
    """(the package's modules ``name`` imports, the top-level names of the other packages it imports)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    internal, external = set(), set()

    def add(target, imported=()):
        for n in imported:  # ``from . import views``: the submodule, if it is one
            if f"{target}.{n}" in MODULES:
                internal.add(f"{target}.{n}")
                imported = [m for m in imported if m != n]
        if target in MODULES and (imported or target != name):
            internal.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "iuq":
                    parts = alias.name.split(".")
                    for i in range(1, len(parts) + 1):  # ``import iuq.engine.trainer`` runs each package
                        add(".".join(parts[:i]))
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            elif node.module.split(".")[0] == "iuq":
                target = node.module
            else:
                external.add(node.module.split(".")[0])
                continue
            add(target, [a.name for a in node.names])
    internal.discard(name)
    return internal, external


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def find_cycle(graph):
    """One import circle of ``graph`` ({module: set of modules}) as a list, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def is_core(name):
    return any(name == c or name.startswith(c + ".") for c in CORE) and name not in CORE_EXCEPTIONS


def test_the_scan_sees_the_whole_package():
    assert {"iuq.engine.trainer", "iuq.inter.samples", "iuq.equi.transforms", "iuq.adapters.base"} <= set(MODULES)
    assert "iuq.inter.samples" in GRAPH["iuq.engine.trainer"][0]  # ``from ..inter.samples import``
    assert "detectron2" in GRAPH["iuq.engine.trainer"][1]


def test_find_cycle_finds_a_circle_through_a_function_level_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_module_graph_has_no_import_circle():
    graph = {name: internal for name, (internal, _) in GRAPH.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_core_imports_no_framework():
    for name, (internal, external) in GRAPH.items():
        if not is_core(name):
            continue
        assert not external & set(FRAMEWORKS), f"{name} (core) imports {sorted(external & set(FRAMEWORKS))}"
        outside = sorted(m for m in internal if not is_core(m))
        assert not outside, f"{name} (core) imports {outside}, which are not core"


def test_import_iuq_and_the_core_pull_in_no_detectron2():
    core = sorted(name for name in MODULES if is_core(name))
    code = (f"import sys, iuq; import {', '.join(core)}; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}); "
            "assert not bad, bad; print(iuq.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == PACKAGE / "__init__.py"  # the iuq of this checkout


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in FRAMEWORKS or (e.name or "").startswith("adet."):
            pytest.skip(f"{name} needs {e.name}, not importable here")
        raise


def test_the_public_names_resolve_from_iuq():
    import iuq

    for name in ("add_iuq_config", "validate_iuq_config", "PixelMemory", "PixelSamples", "sample_pixels",
                 "inter_scene_loss", "SampleDecode", "dot_product_decode", "sample_transform"):
        assert getattr(iuq, name) is not None
    pytest.importorskip("detectron2")
    from iuq.adapters.base import IUQ_ADAPTER_REGISTRY
    from iuq.engine.trainer import IUQTrainer

    assert iuq.IUQTrainer is IUQTrainer and iuq.IUQ_ADAPTER_REGISTRY is IUQ_ADAPTER_REGISTRY
