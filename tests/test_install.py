"""tools/install_frameworks.py and ``python -m iuq.collect_env`` without the frameworks: the fixes
on hand-written sources, what a second run changes, the refusal to mix AdelaiDet and SOTR, local
checkouts left untouched, and the report on fake environments. Runs everywhere (no detectron2).

The installer end to end, into a fresh virtual environment from offline sources, then the
quickstart, is ``test_install_frameworks_end_to_end`` (slow; runs where IUQ_FRAMEWORK_SOURCES is
set, as .ci/run sets it)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import install_frameworks  # noqa: E402
from iuq import frameworks  # noqa: E402
from iuq.frameworks import FRAMEWORKS, apply_fixes  # noqa: E402

# Lines of the shapes the fixes target, written for this test (no framework code).
HEADER = """at::Tensor f(const at::Tensor& input, const at::Tensor& grad) {
  if (input.type().is_cuda()) {
    return g(input);
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.type(), "f", [&] { h<scalar_t>(input); });
  AT_DISPATCH_FLOATING_TYPES(grad.type(), "f_backward", [&] { h<scalar_t>(grad); });
}
"""
HEADER_FIXED = """at::Tensor f(const at::Tensor& input, const at::Tensor& grad) {
  if (input.is_cuda()) {
    return g(input);
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.scalar_type(), "f", [&] { h<scalar_t>(input); });
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "f_backward", [&] { h<scalar_t>(grad); });
}
"""
KERNEL = """#include <THC/THC.h>
#include <THC/THCDeviceUtils.cuh>
int run(at::Tensor boxes, int n) {
  const int blocks = THCCeilDiv(n, 64);
  float* dev = boxes.data<float>();
  THCState *state = at::globalContext().lazyInitCUDA(); // a comment
  unsigned long long* mask = (unsigned long long*) THCudaMalloc(state, n * sizeof(unsigned long long));
  THCudaCheck(cudaMemcpy(dev, dev, n, cudaMemcpyDeviceToHost));
  THCudaFree(state, mask);
  return blocks;
}
"""
KERNEL_FIXED = """#include <ATen/ceil_div.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDACachingAllocator.h>
int run(at::Tensor boxes, int n) {
  const int blocks = at::ceil_div(n, 64);
  float* dev = boxes.data_ptr<float>();
  unsigned long long* mask = (unsigned long long*) c10::cuda::CUDACachingAllocator::raw_alloc(n * sizeof(unsigned long long));
  AT_CUDA_CHECK(cudaMemcpy(dev, dev, n, cudaMemcpyDeviceToHost));
  c10::cuda::CUDACachingAllocator::raw_delete(mask);
  return blocks;
}
"""


def fake_adet(root, flavour):
    """A checkout-shaped tree: adet/ with the flavour's model folder, csrc sources, setup.py."""
    adet = root / "adet"
    (adet / "modeling" / flavour).mkdir(parents=True)
    (adet / "data" / "datasets").mkdir(parents=True)
    (adet / "__init__.py").write_text("")
    (adet / "layers" / "csrc" / "op").mkdir(parents=True)
    (adet / "layers" / "csrc" / "op" / "op.h").write_text(HEADER)
    (adet / "layers" / "csrc" / "op" / "op.cu").write_text(KERNEL)
    (root / "setup.py").write_text('install_requires=[\n    "tqdm",\n    "rapidfuzz",\n    "shapely",\n]\n')
    if flavour == "sotr":
        (adet / "modeling" / "sotr" / "sotr.py").write_text(
            "        for i in range(1, 4):\n            feature_add_all_level += self.convs_all_levels[i](mask_feat)\n")
    return root


def test_adelaidet_fixes_turn_its_sources_into_what_current_torch_builds(tmp_path):
    root = fake_adet(tmp_path, "condinst")
    changed = apply_fixes(FRAMEWORKS["adelaidet"], root)
    csrc = root / "adet" / "layers" / "csrc" / "op"
    assert (csrc / "op.h").read_text() == HEADER_FIXED
    assert (csrc / "op.cu").read_text() == KERNEL_FIXED
    assert (root / "adet" / "data" / "datasets" / "__init__.py").read_text() == ""
    assert '"rapidfuzz<3",' in (root / "setup.py").read_text()
    assert {k: len(v) for k, v in changed.items()} == {"tensor_type": 1, "thc_removal": 1, "data_datasets_init": 1,
                                                       "rapidfuzz_pin": 1}
    # A second run changes nothing.
    assert all(files == [] for files in apply_fixes(FRAMEWORKS["adelaidet"], root).values())


def test_sotr_fixes_include_its_in_place_add(tmp_path):
    root = fake_adet(tmp_path, "sotr")
    apply_fixes(FRAMEWORKS["sotr"], root)
    text = (root / "adet" / "modeling" / "sotr" / "sotr.py").read_text()
    assert "feature_add_all_level = feature_add_all_level + self.convs_all_levels[i](mask_feat)" in text
    assert "+=" not in text
    assert '"rapidfuzz",' in (root / "setup.py").read_text()  # SOTR's dependencies need rapidfuzz 3


def test_installer_refuses_sotr_where_adelaidet_is(monkeypatch):
    monkeypatch.setattr(install_frameworks, "adet_flavours", lambda: [(Path("/x/AdelaiDet/adet"), "adelaidet")])
    with pytest.raises(SystemExit, match=r"(?s)already has `adet` from adelaidet.*venv-sotr.*install_frameworks.py sotr"):
        install_frameworks.refuse_mixing(FRAMEWORKS["sotr"])
    install_frameworks.refuse_mixing(FRAMEWORKS["adelaidet"])  # the same one again: fine
    install_frameworks.refuse_mixing(FRAMEWORKS["mask2former"])  # another package: fine


def test_a_local_checkout_is_copied_and_left_untouched(tmp_path, monkeypatch):
    source = fake_adet(tmp_path / "mine", "condinst")
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    calls = []
    monkeypatch.setattr(install_frameworks, "installed", lambda fw: None)
    monkeypatch.setattr(install_frameworks, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    monkeypatch.setattr(install_frameworks, "build_env", lambda jobs: {"FORCE_CUDA": "0", "MAX_JOBS": str(jobs)})
    monkeypatch.setattr(install_frameworks, "install_requires", lambda fw, dry_run: False)
    monkeypatch.setattr(install_frameworks, "ensure_build_tools", lambda dry_run: None)
    work = tmp_path / "work"
    work.mkdir()
    assert install_frameworks.install_one(FRAMEWORKS["adelaidet"], work, str(source), None, 2, False)
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before
    assert (work / "adelaidet" / "adet" / "layers" / "csrc" / "op" / "op.cu").read_text() == KERNEL_FIXED
    (cmd, kw), = calls
    assert cmd[-4:] == ["install", "--no-build-isolation", "-e", "."] and kw["cwd"] == work / "adelaidet"
    assert kw["env"] == {"FORCE_CUDA": "0", "MAX_JOBS": "2"}


def git_archive(tree, name, tarball):
    """``tree`` committed to a new repository and exported as ``git archive --prefix NAME/``, as
    the pinned sources in ../shared/frameworks are made; returns the commit."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tree)]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + cmd, check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(git + ["archive", "--format", "tar.gz", "--prefix", f"{name}/", "-o", str(tarball), "HEAD"], check=True)
    return commit


@pytest.fixture
def adelaidet_tarball(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed to make a `git archive` tarball")
    tarball = tmp_path / "AdelaiDet-test.tar.gz"
    commit = git_archive(fake_adet(tmp_path / "src", "condinst"), "AdelaiDet", tarball)
    return tarball, commit


def installs_from(tarball, work, commit_flag, monkeypatch):
    monkeypatch.setattr(install_frameworks, "installed", lambda fw: None)
    monkeypatch.setattr(install_frameworks, "run", lambda cmd, **kw: None)
    monkeypatch.setattr(install_frameworks, "install_requires", lambda fw, dry_run: False)
    monkeypatch.setattr(install_frameworks, "ensure_build_tools", lambda dry_run: None)
    return install_frameworks.install_one(FRAMEWORKS["adelaidet"], work, str(tarball), commit_flag, 2, False)


def test_a_tarball_at_the_asked_commit_is_unpacked_fixed_and_its_commit_recorded(adelaidet_tarball, tmp_path,
                                                                                monkeypatch):
    tarball, commit = adelaidet_tarball
    assert install_frameworks.tarball_commit(tarball) == commit  # what `git get-tar-commit-id` reads
    assert installs_from(tarball, tmp_path, commit, monkeypatch)
    dest = tmp_path / "adelaidet"
    assert (dest / "adet" / "layers" / "csrc" / "op" / "op.cu").read_text() == KERNEL_FIXED  # top folder stripped
    assert frameworks.git_commit(dest / "adet") == commit  # no .git: read from the record
    assert not (tmp_path / "adelaidet.partial").exists()


def test_a_tarball_at_another_commit_is_refused_with_both_commits(adelaidet_tarball, tmp_path, monkeypatch):
    tarball, commit = adelaidet_tarball  # not AdelaiDet's tested commit
    tested = FRAMEWORKS["adelaidet"].commit
    with pytest.raises(SystemExit, match=rf"holds adelaidet at {commit[:7]}, but the tests run against {tested[:7]}"
                                         rf".*--commit {commit}"):
        installs_from(tarball, tmp_path, None, monkeypatch)
    with pytest.raises(SystemExit, match=rf"at {commit[:7]}, but you asked for 0123456"):
        installs_from(tarball, tmp_path, "0123456", monkeypatch)
    assert not (tmp_path / "adelaidet").exists()  # nothing installed


def test_a_tarball_without_a_commit_is_refused_unless_vouched_for(tmp_path, monkeypatch):
    import tarfile

    source = fake_adet(tmp_path / "AdelaiDet", "condinst")
    tarball = tmp_path / "plain.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(source, arcname="AdelaiDet")
    assert install_frameworks.tarball_commit(tarball) is None
    with pytest.raises(SystemExit, match=r"cannot tell which commit of adelaidet.*--commit COMMIT"):
        installs_from(tarball, tmp_path / "w1", None, monkeypatch)
    (tmp_path / "w2").mkdir()
    assert installs_from(tarball, tmp_path / "w2", FRAMEWORKS["adelaidet"].commit, monkeypatch)
    assert (tmp_path / "w2" / "adelaidet" / "setup.py").is_file()


def test_a_checkout_at_another_commit_is_refused(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is needed")
    source = fake_adet(tmp_path / "src", "condinst")
    commit = git_archive(source, "AdelaiDet", tmp_path / "unused.tar.gz")
    with pytest.raises(SystemExit, match=rf"{source} holds adelaidet at {commit[:7]}"):
        installs_from(source, tmp_path, None, monkeypatch)


def test_undeclared_imports_are_installed_where_missing(monkeypatch):
    import importlib.util

    calls = []
    monkeypatch.setattr(install_frameworks, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "timm" else object())
    assert install_frameworks.install_requires(FRAMEWORKS["sparseinst"], dry_run=False)
    assert calls == [[sys.executable, "-m", "pip", "install", "timm"]]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert not install_frameworks.install_requires(FRAMEWORKS["sparseinst"], dry_run=False)  # nothing missing
    assert len(calls) == 1


def test_what_is_installed_is_left_as_it_is(monkeypatch, capsys):
    monkeypatch.setattr(install_frameworks, "installed", lambda fw: Path("/somewhere") / fw.package)
    monkeypatch.setattr(install_frameworks, "install_requires", lambda fw, dry_run: False)
    monkeypatch.setattr(install_frameworks, "run", lambda *a, **k: pytest.fail("nothing may run"))
    assert not install_frameworks.install_one(FRAMEWORKS["adelaidet"], Path("/nowhere"), None, None, 2, False)
    assert "adelaidet: already installed at /somewhere/adet" in capsys.readouterr().out


def test_mask2former_goes_on_the_path_with_a_cpu_stand_in_for_its_op(tmp_path, monkeypatch):
    root = tmp_path / "mask2former"
    root.mkdir()
    monkeypatch.setattr(install_frameworks, "cuda_build", lambda: False)
    monkeypatch.setattr(install_frameworks, "site_packages", lambda: tmp_path)
    monkeypatch.setattr(install_frameworks, "run", lambda *a, **k: None)
    install_frameworks.put_on_path(FRAMEWORKS["mask2former"], root, dry_run=False)
    assert (tmp_path / "iuq-framework-mask2former.pth").read_text().split() == [str(root), str(tmp_path / "iuq_shims")]
    stand_in = (tmp_path / "iuq_shims" / "MultiScaleDeformableAttention.py").read_text()
    from iuq.collect_env import STAND_IN

    assert stand_in.startswith('"""' + STAND_IN)


# Run in a child Python where only the given folders provide the frameworks: the real ones (if
# installed here) are hidden, by path entry or by name, and torch stays importable.
HIDE = """
import importlib.abc, sys
from pathlib import Path
NAMES = ("detectron2", "adet", "mask2former", "sparseinst", "MultiScaleDeformableAttention")
FAKES = {fakes!r}
def provided(top, where):
    return (Path(where) / top).is_dir() or (Path(where) / (top + ".py")).is_file()
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in NAMES and not any(provided(top, f) for f in FAKES):
            raise ModuleNotFoundError("No module named %r (hidden by the test)" % name, name=name)
sys.meta_path.insert(0, Hide())
sys.path[:] = FAKES + [{projects!r}] + [p for p in sys.path
    if provided("torch", p or ".") or not any(provided(n, p or ".") for n in NAMES)]
from iuq.collect_env import collect_env_info
print(collect_env_info())
"""


def report(paths):
    """``python -m iuq.collect_env``'s report where only ``paths`` provide frameworks."""
    code = HIDE.format(fakes=[str(p) for p in paths], projects=str(REPO / "projects"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_report_without_any_framework_says_what_to_run(tmp_path):
    out = report([])
    assert "detectron2 not installed" in out
    assert "detectron2 is not installed\n  fix: python tools/install_frameworks.py adelaidet" in out
    for name in ("adelaidet", "sotr", "mask2former", "sparseinst"):
        assert any(line.split()[:2] == [name, "no"] for line in out.splitlines()), name


def test_report_detects_the_known_snags(tmp_path):
    ade, sotr = fake_adet(tmp_path / "AdelaiDet", "condinst"), fake_adet(tmp_path / "SOTR", "sotr")
    m2f = tmp_path / "Mask2Former"
    (m2f / "mask2former").mkdir(parents=True)
    (m2f / "mask2former" / "__init__.py").write_text("")
    out = report([ade, sotr, m2f])
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["adelaidet"], ["sotr"], ["mask2former"])}
    assert rows["adelaidet"].split()[1] == "yes" and str(ade / "adet") in rows["adelaidet"]
    assert "_C missing" in rows["adelaidet"]
    assert "another framework" in rows["sotr"]  # shadowed by AdelaiDet's adet, first on the path
    assert "AdelaiDet and SOTR mixed" in out and f"{sotr / 'adet'} (sotr)" in out
    assert f"{ade / 'adet'}/data/datasets has no __init__.py" in out
    assert "Mask2Former's MultiScaleDeformableAttention op is not built" in out
    # With the installer's stand-in, the op is reported as such and the snag is gone.
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "MultiScaleDeformableAttention.py").write_text('"""Stand-in written by iuq tools/install_frameworks.py"""\n')
    out = report([ade, m2f, shims])
    assert "CPU stand-in (PyTorch fallback)" in out and "op is not built" not in out and "mixed" not in out


def test_report_in_this_environment_matches_what_imports():
    """The report here, as a user runs it: with detectron2, its own collect_env table first, then
    ours, whose rows agree with what actually imports."""
    import importlib.util

    out = subprocess.run([sys.executable, "-m", "iuq.collect_env"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in ("detectron2", "adelaidet", "sotr") and len(line.split()) > 1}
    has_d2 = importlib.util.find_spec("detectron2") is not None
    assert rows["detectron2"] == ("yes" if has_d2 else "no")
    if has_d2:
        assert "PyTorch built with" in out  # detectron2's own report
    adet = importlib.util.find_spec("adet")
    for name, marker in (("adelaidet", "condinst"), ("sotr", "sotr")):
        here = adet is not None and (Path(list(adet.submodule_search_locations)[0]) / "modeling" / marker).is_dir()
        assert rows[name] == ("yes" if here else "no"), name


def framework_source(root, name):
    """A framework's source in ``root``: its `git archive` tarball ``NAME-<commit>.tar.gz`` (as in
    ../shared/frameworks) or its checkout ``NAME/``."""
    found = sorted(root.glob(f"{name}-*.tar.gz")) or [root / name]
    return str(found[0])


@pytest.mark.skipif(not os.environ.get("IUQ_FRAMEWORK_SOURCES"),
                    reason="set IUQ_FRAMEWORK_SOURCES to a folder holding detectron2 and AdelaiDet tarballs (as "
                           "../shared/frameworks) or checkouts (slow: a fresh virtual environment, builds both, "
                           "trains; ~10 min on 2 cores; .ci/run sets it)")
def test_install_frameworks_end_to_end(tmp_path):
    """The path a new user takes, from nothing to a trained model: in a fresh virtual environment,
    README's install commands with the offline sources, a second run that changes nothing, the
    report, then README's quickstart for a few iterations with its evaluation. Prints each step's
    time and the disk it took (``-s`` shows them)."""
    import time

    sources = Path(os.environ["IUQ_FRAMEWORK_SOURCES"])
    venv, work = tmp_path / "venv", tmp_path / "fw"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")

    def sh(*cmd, **env):
        start = time.perf_counter()
        out = subprocess.run([py, *cmd], cwd=REPO, check=True, capture_output=True, text=True,
                             env={**os.environ, **env}).stdout
        print(f"[e2e] {' '.join(cmd[:2])}: {time.perf_counter() - start:.0f} s")
        return out

    def disk(path):
        return subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True).stdout.split()[0]

    sh("-m", "pip", "install", "-q", "-r", "requirements/tested.txt", "-e", ".")
    print(f"[e2e] venv after the package: {disk(venv)}")
    first = sh("tools/install_frameworks.py", "adelaidet", "--source", framework_source(sources, "AdelaiDet"),
               "--detectron2-source", framework_source(sources, "detectron2"), "--workdir", str(work), "--jobs", "2")
    print(f"[e2e] venv after the frameworks: {disk(venv)}; their checkouts and builds: {disk(work)}")
    assert "check: CondInst trained one step with IUQ on" in first and "check: SOLOv2 trained one step" in first
    assert "adelaidet: fix tensor_type: adet/layers/csrc/" in first
    second = sh("tools/install_frameworks.py", "adelaidet", "--workdir", str(work))
    assert "detectron2: already installed" in second and "nothing to do" in second
    env = sh("-m", "iuq.collect_env")
    assert any(line.split()[:2] == ["adelaidet", "yes"] for line in env.splitlines())
    assert "known snags: none detected" in env
    out = tmp_path / "quickstart"
    sh("train_net.py", "--config-file", "configs/quickstart.yaml", "SOLVER.MAX_ITER", "5",
       "OUTPUT_DIR", str(out), IUQ_QUICKSTART_ROOT=str(tmp_path / "datasets"), OMP_NUM_THREADS="2")
    assert (out / "model_final.pth").is_file()
    assert "copypaste: Task: segm" in (out / "log.txt").read_text()  # trained, then evaluated on its val split
