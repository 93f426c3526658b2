#!/usr/bin/env python3
"""Install detectron2 and a base framework into the *current* Python environment, checked.

    python tools/install_frameworks.py adelaidet             # CondInst, SOLOv2
    python tools/install_frameworks.py sotr                  # in an environment of its own
    python tools/install_frameworks.py mask2former | sparseinst | solq
    python tools/install_frameworks.py adelaidet --source ~/src/AdelaiDet --detectron2-source ~/src/detectron2
    python tools/install_frameworks.py adelaidet --source AdelaiDet-3672122.tar.gz \
        --detectron2-source detectron2-02b5c4e.tar.gz          # offline: `git archive` tarballs

None of them is on a package registry. The installer clones the commits our tests run against
(``iuq.frameworks``; ``--commit`` / ``--detectron2-commit`` to choose others) into ``--workdir``
(default ``./frameworks``), or takes local sources (``--source``, ``--detectron2-source``: for
machines without access to GitHub): a checkout is copied (your checkout itself is never
modified), a ``git archive`` tarball is unpacked. Either way the source's commit (the checkout's
HEAD, the tarball's header) must be the tested one or the one ``--commit`` names: a mismatch is
refused with what was found, never installed silently. Then it applies the
fixes they need with current PyTorch (``iuq.frameworks.FIXES``: our code, documented there),
builds against the installed torch (``pip install --no-build-isolation -e``; CUDA ops where a
CUDA toolkit and GPU are present), and ends by building the framework's models and running one
CPU training step with IUQ on (``--no-check`` skips it). What is installed already is said and
left as it is, so a second run changes nothing (and checks nothing unless ``--check``). AdelaiDet and SOTR are both the package ``adet``:
it refuses to put the second in an environment that has the first.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "projects"))  # `iuq` without installing: it needs no detectron2

from iuq.frameworks import (DETECTRON2, FRAMEWORKS, SOURCE_RECORD, adet_flavours, apply_fixes,  # noqa: E402
                            git_commit, installed)

# One CPU training step with IUQ on, per model (small: random init, short side 128, 2 images).
STEP = ["SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "200",
        "MODEL.IUQ.MEMORY.SIZE", "1000"]
CHECKS = {
    "adelaidet": [("CondInst", "configs/quickstart.yaml", []), ("SOLOv2", "configs/quickstart_solov2.yaml", [])],
    "sotr": [("SOTR", "configs/IUQ/SOTR/R50.yaml",
              ["MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('iuq_quickstart_train',)", "MODEL.RESNETS.NORM", "BN",
               "MODEL.BACKBONE.FREEZE_AT", "0", "SOLVER.BASE_LR", "0.0001"])],
    "mask2former": [("Mask2Former", "configs/IUQ/Mask2Former/R50.yaml",
                     ["MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('iuq_quickstart_train',)", "INPUT.IMAGE_SIZE", "128",
                      "SOLVER.AMP.ENABLED", "False"])],
    "sparseinst": [("SparseInst", "configs/IUQ/SparseInst/R50_GIAM.yaml",
                    ["MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('iuq_quickstart_train',)", "MODEL.RESNETS.NORM", "BN"])],
    "solq": [("SOLQ", "configs/IUQ/SOLQ/R50.yaml",
              ["MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('iuq_quickstart_train',)", "MODEL.SOLQ.NUM_CLASSES", "80",
               "MODEL.SOLQ.CLASS_IDS", "contiguous", "MODEL.SOLQ.ENC_LAYERS", "1", "MODEL.SOLQ.DEC_LAYERS", "2",
               "MODEL.SOLQ.NUM_QUERIES", "50", "MODEL.IUQ.MEMORY.SIZE", "4"])],
}

def say(message):
    print(f"[install] {message}", flush=True)


def run(cmd, cwd=None, env=None, dry_run=False):
    say("$ " + " ".join(str(c) for c in cmd) + (f"   (in {cwd})" if cwd else ""))
    if not dry_run:
        subprocess.run([str(c) for c in cmd], cwd=cwd, env={**os.environ, **(env or {})}, check=True)


def cuda_build():
    """Whether CUDA ops can be built here: a GPU torch sees and a CUDA toolkit (CUDA_HOME)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(torch.cuda.is_available() and CUDA_HOME)


def build_env(jobs):
    return {"FORCE_CUDA": "1" if cuda_build() else "0", "MAX_JOBS": str(jobs)}


TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


def is_tarball(path):
    return path.is_file() and path.name.endswith(TARBALL_SUFFIXES)


def tarball_commit(tarball):
    """The commit a ``git archive`` tarball was made from (its pax header's ``comment``, what
    ``git get-tar-commit-id`` reads), or None."""
    with tarfile.open(tarball) as tar:
        tar.next()  # the global pax header is read with the first member
        commit = tar.pax_headers.get("comment", "").strip()
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def check_source_commit(framework, source, found, commit):
    """Refuse a source whose commit is not the one asked for (``commit``, else the tested one)."""
    flag = "--detectron2-commit" if framework is DETECTRON2 else "--commit"
    wanted = commit or framework.commit
    if found is None:
        if commit:
            say(f"{framework.name}: {source} does not say its commit; installing it as {flag} {commit} asks")
            return
        raise SystemExit(
            f"[install] {source}: cannot tell which commit of {framework.name} it holds (no git checkout, no "
            f"`git archive` header), and the tests run against {framework.commit[:7]}. Make it with `git archive "
            f"{framework.commit[:7]}`, or vouch for it with {flag} COMMIT.")
    if not (found.startswith(wanted) or wanted.startswith(found)):
        raise SystemExit(
            f"[install] {source} holds {framework.name} at {found[:7]}, but {'you asked for' if commit else 'the tests run against'} "
            f"{wanted[:7]}. Use a source at {wanted[:7]} (`git archive {wanted[:7]}` on a machine with access), or "
            f"install this one anyway with {flag} {found}.")


def unpack(framework, tarball, dest, dry_run):
    """Unpack a ``git archive`` tarball (one top folder) to ``dest``, recording its commit in
    ``dest/.iuq-source`` (``iuq.frameworks.git_commit`` reads it: an archive has no ``.git``)."""
    say(f"{framework.name}: unpacking {tarball} to {dest}")
    if dry_run:
        return
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(partial, filter="data")
    tops = [p for p in partial.iterdir()]
    if len(tops) != 1 or not tops[0].is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(f"[install] {tarball}: expected one top folder (as `git archive --prefix NAME/` makes), "
                         f"found {sorted(p.name for p in tops)}")
    tops[0].rename(dest)
    partial.rmdir()
    (dest / SOURCE_RECORD).write_text(f"{tarball_commit(tarball)}\n{tarball}\n")


def obtain(framework, dest, source, commit, dry_run):
    """A checkout of ``framework`` at ``dest``: the one already there, a copy of the checkout
    ``source`` or the unpacked tarball ``source`` (checked against ``commit``, else the tested
    commit), or a clone of its URL at ``commit``."""
    if dest.exists():
        say(f"{framework.name}: using the checkout already at {dest}")
        return
    if source:
        source = Path(source).expanduser().resolve()
        if is_tarball(source):
            check_source_commit(framework, source, tarball_commit(source), commit)
            unpack(framework, source, dest, dry_run)
            return
        if not source.is_dir():
            raise SystemExit(f"[install] --source {source}: neither a directory (a checkout) nor a tarball "
                             f"({', '.join(TARBALL_SUFFIXES)})")
        if not (source / ".git").exists():
            say(f"{framework.name}: {source} is not a git checkout: its commit cannot be checked")
        elif not commit:  # with --commit, the copy is checked out at it below
            check_source_commit(framework, source, git_commit(source), None)
        say(f"{framework.name}: copying {source} to {dest} (your checkout is left as it is)")
        if not dry_run:
            shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("build", "*.so", "*.egg-info"))
        if commit:
            run(["git", "checkout", "-q", commit], cwd=dest, dry_run=dry_run)
        return
    run(["git", "clone", "-q", framework.url, dest], dry_run=dry_run)
    run(["git", "checkout", "-q", commit or framework.commit], cwd=dest, dry_run=dry_run)


def ensure_build_tools(dry_run):
    """``--no-build-isolation`` builds with what the environment has: a fresh virtual environment
    lacks ``wheel`` (setuptools then fails with "invalid command 'bdist_wheel'")."""
    import importlib.util

    if importlib.util.find_spec("wheel") is None:
        run([sys.executable, "-m", "pip", "install", "wheel", "setuptools>=64"], dry_run=dry_run)


def site_packages():
    return Path(sysconfig.get_paths()["purelib"])


def put_on_path(framework, root, dry_run):
    """Mask2Former and SparseInst have no setup.py: a ``.pth`` file in site-packages puts their
    root on the path. Mask2Former's deformable-attention op builds only with CUDA; without it an
    empty ``MultiScaleDeformableAttention`` module (ours, under ``root/../iuq_shims``) lets
    ``import mask2former`` succeed, and its layer then runs its PyTorch path on the CPU."""
    entries = [str(root)]
    if framework.name == "solq":
        entries = [solq_on_path(root, dry_run)]
    if framework.name == "mask2former":
        if cuda_build():
            run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "."],
                cwd=root / "mask2former/modeling/pixel_decoder/ops", dry_run=dry_run)
        else:
            shim = root.parent / "iuq_shims"
            say(f"mask2former: no CUDA here, so its op is not built; an empty MultiScaleDeformableAttention in {shim} "
                "lets its deformable attention run in PyTorch (CPU)")
            if not dry_run:
                shim.mkdir(exist_ok=True)
                (shim / "MultiScaleDeformableAttention.py").write_text(
                    '"""Stand-in written by iuq tools/install_frameworks.py: Mask2Former\'s CUDA op is not built '
                    'here; its MSDeformAttn falls back to PyTorch on CPU tensors."""\n')
            entries.append(str(shim))
    requirements = root / "requirements.txt"
    if requirements.is_file():
        run([sys.executable, "-m", "pip", "install", "-r", requirements], dry_run=dry_run)
    pth = site_packages() / f"iuq-framework-{framework.name}.pth"
    say(f"{framework.name}: {pth} puts {', '.join(entries)} on the path")
    if not dry_run:
        pth.write_text("\n".join(entries) + "\n")


def solq_on_path(root, dry_run):
    """SOLQ's checkout is the package ``solq`` (``iuq.frameworks.fix_solq_package``): the path gets
    a folder holding only a ``solq`` link to it (the checkout's parent holds the other frameworks'
    checkouts, which must not become importable by their folder names). With CUDA, its op is
    built too (``models/ops``; the stand-in hands CUDA tensors to it); without, the stand-in runs
    SOLQ's PyTorch implementation. Returns the folder."""
    folder = root.parent / "iuq_solq_path"
    if cuda_build():
        run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "."], cwd=root / "models/ops",
            dry_run=dry_run)
    else:
        say("solq: no CUDA here, so its op is not built; its deformable attention runs SOLQ's PyTorch "
            "implementation (the stand-in models/ops/functions/iuq_ms_deform_attn.py)")
    say(f"solq: {folder / 'solq'} -> {root}")
    if not dry_run:
        folder.mkdir(exist_ok=True)
        link = folder / "solq"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(root, target_is_directory=True)
    return str(folder)


def refuse_mixing(framework):
    """AdelaiDet and SOTR are both ``adet``: refuse the second in an environment with the first."""
    if framework.package != "adet":
        return
    others = [(loc, name) for loc, name in adet_flavours() if framework.name not in name.split("+")]
    if others:
        loc, name = others[0]
        raise SystemExit(
            f"[install] refusing: this environment already has `adet` from {name} ({loc}). AdelaiDet and SOTR "
            f"are both the package `adet`, so one environment holds one of them; installing {framework.name} here "
            f"would shadow the other. Make an environment for it:\n"
            f"    python3 -m venv venv-{framework.name} && source venv-{framework.name}/bin/activate\n"
            f"    pip install -r requirements/tested.txt -e . && python tools/install_frameworks.py {framework.name}"
        )


def install_requires(framework, dry_run):
    """What ``framework`` imports without declaring it (``Framework.requires``), where missing.
    Returns whether anything was installed."""
    import importlib.util

    missing = [spec for spec, module in framework.requires if importlib.util.find_spec(module) is None]
    if missing:
        say(f"{framework.name}: imports {', '.join(missing)} without declaring it")
        run([sys.executable, "-m", "pip", "install", *missing], dry_run=dry_run)
    return bool(missing)


def install_one(framework, workdir, source, commit, jobs, dry_run):
    where = installed(framework)
    if where is not None:
        say(f"{framework.name}: already installed at {where} (commit {git_commit(where) or 'unknown'}); left as it is")
        return install_requires(framework, dry_run)
    dest = workdir / framework.name
    obtain(framework, dest, source, commit, dry_run)
    if not dry_run:
        for fix, files in apply_fixes(framework, dest).items():
            say(f"{framework.name}: fix {fix}: " + (", ".join(str(f.relative_to(dest)) for f in files) or "nothing to change"))
    if framework.setup_py:
        ensure_build_tools(dry_run)
        run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "-e", "."], cwd=dest,
            env=build_env(jobs), dry_run=dry_run)
    else:
        put_on_path(framework, dest, dry_run)
    install_requires(framework, dry_run)
    return True


def check(name, workdir, keep):
    """Build the framework's models and run one CPU training step with IUQ on (or, without an
    adapter yet, build its own model); raise SystemExit naming what failed."""
    out = Path(tempfile.mkdtemp(prefix=f"iuq-check-{name}-"))
    env = {"IUQ_QUICKSTART_ROOT": str(out / "datasets"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    try:
        for model, config, extra in CHECKS.get(name, []):
            start = time.perf_counter()
            cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(REPO / config)]
            cmd += STEP + extra + ["OUTPUT_DIR", str(out / model)]
            try:
                run(cmd, env=env)
            except subprocess.CalledProcessError:
                raise SystemExit(f"[install] check failed: one CPU training step of {model} with IUQ on ({config}); "
                                 f"its log is in {out / model}") from None
            say(f"check: {model} trained one step with IUQ on ({time.perf_counter() - start:.0f} s)")
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("framework", choices=sorted(FRAMEWORKS))
    p.add_argument("--source", help="a local checkout of the framework (copied; not modified) or a `git archive` tarball")
    p.add_argument("--commit", help="the framework's commit (default: the tested one)")
    p.add_argument("--detectron2-source", help="a local checkout of detectron2 (copied; not modified) or a `git archive` tarball")
    p.add_argument("--detectron2-commit", help=f"default: {DETECTRON2.commit[:7]}")
    p.add_argument("--workdir", default="frameworks", help="where the checkouts are built and stay (editable installs)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs (MAX_JOBS)")
    p.add_argument("--no-check", action="store_true", help="skip building the models and the training step")
    p.add_argument("--check", action="store_true", help="run the check even when nothing was installed")
    p.add_argument("--keep-check", action="store_true", help="keep the check's output folder")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    args = p.parse_args(argv)

    try:
        import torch
    except ImportError:
        raise SystemExit("[install] torch is not installed: first `pip install -r requirements/tested.txt -e .`") from None
    framework = FRAMEWORKS[args.framework]
    workdir = Path(args.workdir).expanduser().resolve()
    say(f"torch {torch.__version__}, CUDA ops: {'yes' if cuda_build() else 'no (CPU build)'}; checkouts in {workdir}")
    refuse_mixing(framework)
    if not args.dry_run:
        workdir.mkdir(parents=True, exist_ok=True)
    changed = install_one(DETECTRON2, workdir, args.detectron2_source, args.detectron2_commit, args.jobs, args.dry_run)
    changed |= install_one(framework, workdir, args.source, args.commit, args.jobs, args.dry_run)
    if not changed:
        say(f"nothing to do: detectron2 and {framework.name} are installed (--check runs the check anyway)")
    if (changed or args.check) and not (args.no_check or args.dry_run):
        check(framework.name, workdir, args.keep_check)
    say("done")


if __name__ == "__main__":
    main()
