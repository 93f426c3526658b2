"""What this environment has for IUQ, in the manner of ``python -m detectron2.utils.collect_env``
(whose report it prints first where detectron2 is installed):

    python -m iuq.collect_env

then, per base framework, whether it is importable and from where, its commit where it is a git
checkout, its compiled ops, and the known snags detected, each with its fix. Nothing is imported
from the frameworks themselves (``import mask2former`` fails where its op is missing): everything
is read from the file system and the packages' metadata.
"""
import importlib.metadata
import sys
from pathlib import Path

from .frameworks import (DETECTRON2, FRAMEWORKS, adet_flavours, find_spec, git_commit, install_command, installed,
                         package_locations)

STAND_IN = "Stand-in written by iuq"  # the first words of the installer's empty MultiScaleDeformableAttention


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _compiled(location, module):
    """Whether ``location`` (a package directory) holds the compiled extension ``module`` (e.g. _C)."""
    return any(location.glob(f"{module}.*.so")) or any(location.glob(f"{module}.*.pyd")) or any(location.glob(f"{module}.so"))


def mask2former_op():
    """Mask2Former's deformable-attention op: 'built', 'CPU stand-in' (the installer's empty
    module: PyTorch fallback, CPU only) or 'missing'."""
    spec = find_spec("MultiScaleDeformableAttention")
    if spec is None:
        return "missing"
    origin = Path(spec.origin or "")
    if origin.suffix == ".py" and STAND_IN in origin.read_text():
        return "CPU stand-in (PyTorch fallback)"
    return "built"


def solq_op(where):
    """SOLQ's deformable-attention op (``where``: its package directory): 'CUDA op built + CPU
    stand-in', 'CPU stand-in (PyTorch)' (the installer's ``iuq_ms_deform_attn.py``: SOLQ's PyTorch
    implementation) or 'missing: its op raises on the CPU' (a checkout the installer did not fix)."""
    from .frameworks import SOLQ_OP_STAND_IN

    if not (where / "models" / "ops" / "functions" / SOLQ_OP_STAND_IN).is_file():
        return "missing: its op raises on the CPU"
    built = mask2former_op() == "built"  # the same Deformable DETR op, whichever framework built it
    return "CUDA op built + CPU stand-in" if built else "CPU stand-in (PyTorch)"


def frameworks_table():
    """Rows (framework, status, location, commit, compiled ops, models)."""
    rows = []
    for fw in (DETECTRON2, *FRAMEWORKS.values()):
        where = installed(fw)
        if where is None:
            other = package_locations(fw.package)
            status = f"no (`{fw.package}` here is another framework)" if other and fw.marker else "no"
            rows.append((fw.name, status, "", "", "", ", ".join(fw.models)))
            continue
        if fw.name == "mask2former":
            ops = mask2former_op()
        elif fw.name == "solq":
            ops = solq_op(where)
        elif fw.setup_py:
            ops = "_C built" if _compiled(where, "_C") else "_C missing"
        else:
            ops = "none needed"
        commit = git_commit(where)
        tested = "" if commit is None else (" (tested)" if commit == fw.commit else f" (tested: {fw.commit[:7]})")
        rows.append((fw.name, "yes", str(where), (commit[:7] if commit else "unknown") + tested, ops, ", ".join(fw.models)))
    return rows


def snags():
    """[(snag, fix)] for the known problems detected here."""
    found = []
    flavours = adet_flavours()
    if len(flavours) > 1 or any("+" in name for _, name in flavours):
        found.append((
            "AdelaiDet and SOTR mixed: `adet` is importable from " + "; ".join(f"{loc} ({n})" for loc, n in flavours)
            + " and one shadows the other",
            "give each its own environment (README: SOTR); `pip uninstall` the one this environment should not have",
        ))
    adelaidet = installed(FRAMEWORKS["adelaidet"])
    rapidfuzz = _version("rapidfuzz")
    if adelaidet is not None and rapidfuzz and int(rapidfuzz.split(".")[0]) >= 3:
        found.append((f"rapidfuzz {rapidfuzz}: AdelaiDet's adet.evaluation imports rapidfuzz.string_metric (gone in 3.x)",
                      'pip install "rapidfuzz<3"'))
    for name in ("adelaidet", "sotr"):
        where = installed(FRAMEWORKS[name])
        if where is not None and (where / "data" / "datasets").is_dir() and not (where / "data" / "datasets" / "__init__.py").exists():
            found.append((f"{where}/data/datasets has no __init__.py: a non-editable install leaves it out",
                          f"touch {where}/data/datasets/__init__.py, then reinstall"))
        if where is not None and not _compiled(where, "_C"):
            found.append((f"{name}'s compiled ops (adet._C) are not built", install_command(name)))
    for fw in FRAMEWORKS.values():
        if installed(fw) is not None:
            for spec, module in fw.requires:
                if find_spec(module) is None:
                    found.append((f"{fw.name} imports {module}, which is not installed (it does not declare it)",
                                  f'pip install "{spec}"'))
    if installed(FRAMEWORKS["mask2former"]) is not None and mask2former_op() == "missing":
        found.append(("Mask2Former's MultiScaleDeformableAttention op is not built: `import mask2former` fails",
                      "with CUDA: cd mask2former/modeling/pixel_decoder/ops && sh make.sh; on a CPU: "
                      + install_command("mask2former") + " (an empty stand-in: PyTorch fallback)"))
    solq = installed(FRAMEWORKS["solq"])
    if solq is not None and solq_op(solq).startswith("missing"):
        found.append((f"SOLQ at {solq} lacks the installer's op stand-in: its deformable attention raises on the CPU",
                      install_command("solq") + " (applies iuq.frameworks' SOLQ fixes to its own unpacked copy)"))
    if find_spec("detectron2") is None:
        found.append(("detectron2 is not installed", install_command("adelaidet") + "  (or sotr, mask2former, sparseinst)"))
    return found


def collect_env_info():
    from tabulate import tabulate

    parts = []
    try:
        from detectron2.utils.collect_env import collect_env_info as d2_info

        parts.append(d2_info())
    except ImportError:
        torch = find_spec("torch") and _version("torch")
        parts.append(f"Python {sys.version.split()[0]}; torch {torch or 'not installed'}; detectron2 not installed")
    iuq = Path(__file__).resolve().parent
    parts.append(f"iuq @{iuq} (commit {(git_commit(iuq) or 'unknown')[:7]})")
    parts.append(tabulate(frameworks_table(), headers=["framework", "importable", "location", "commit", "compiled ops",
                                                       "models"]))
    found = snags()
    parts.append("known snags: none detected" if not found else
                 "known snags:\n" + "\n".join(f"- {what}\n  fix: {fix}" for what, fix in found))
    return "\n\n".join(parts)


def main():
    print(collect_env_info())


if __name__ == "__main__":
    main()
