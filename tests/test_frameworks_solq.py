"""The installer's SOLQ fixes (``iuq.frameworks``) on hand-written lines of the shapes they target
(no SOLQ code, no detectron2): each edit, and a second run that changes nothing. Against the real
SOLQ the installed checkout is what ``tests/test_integration_solq.py`` imports."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from iuq import frameworks  # noqa: E402
from iuq.frameworks import FRAMEWORKS, apply_fixes  # noqa: E402


def fake_solq(root):
    (root / "models" / "ops" / "functions").mkdir(parents=True)
    (root / "models" / "ops" / "src" / "cuda").mkdir(parents=True)
    (root / "util").mkdir()
    (root / "models" / "backbone.py").write_text(
        "from util.misc import NestedTensor, is_main_process\n"
        "        backbone = getattr(torchvision.models, name)(\n"
        "            pretrained=is_main_process(), norm_layer=norm_layer)\n")
    (root / "models" / "segmentation.py").write_text("import util.box_ops as box_ops\nfrom util import box_ops\n")
    (root / "models" / "deformable_transformer.py").write_text("from models.ops.modules import MSDeformAttn\n")
    (root / "models" / "ops" / "functions" / "ms_deform_attn_func.py").write_text(
        "import torch\nimport MultiScaleDeformableAttention as MSDA\n")
    (root / "models" / "ops" / "src" / "cuda" / "op.cu").write_text(
        'AT_ASSERTM(value.type().is_cuda(), "value must be a CUDA tensor");\n'
        'AT_DISPATCH_FLOATING_TYPES(value.type(), "f", ([&] { g(); }));\n')
    (root / "util" / "misc.py").write_text(
        "if float(torchvision.__version__[:3]) < 0.5:\n    pass\nelif float(torchvision.__version__[:3]) < 0.7:\n"
        "    pass\n")
    return root


def test_solq_fixes_make_its_checkout_the_package_solq(tmp_path):
    root = fake_solq(tmp_path / "solq")
    changed = apply_fixes(FRAMEWORKS["solq"], root)
    assert all(changed.values()), changed
    assert (root / "__init__.py").is_file()
    assert (root / "models" / "backbone.py").read_text().startswith("from ..util.misc import NestedTensor")
    assert "pretrained=False, norm_layer" in (root / "models" / "backbone.py").read_text()
    assert (root / "models" / "segmentation.py").read_text() == "from ..util import box_ops as box_ops\nfrom ..util import box_ops\n"
    assert (root / "models" / "deformable_transformer.py").read_text() == "from .ops.modules import MSDeformAttn\n"
    func = (root / "models" / "ops" / "functions" / "ms_deform_attn_func.py").read_text()
    assert "import MultiScaleDeformableAttention" not in func and "from . import iuq_ms_deform_attn as MSDA" in func
    stand_in = (root / "models" / "ops" / "functions" / frameworks.SOLQ_OP_STAND_IN).read_text()
    assert stand_in == frameworks.SOLQ_OP_STAND_IN_SOURCE and "ms_deform_attn_core_pytorch" in stand_in
    compile(stand_in, "iuq_ms_deform_attn.py", "exec")
    cu = (root / "models" / "ops" / "src" / "cuda" / "op.cu").read_text()
    assert "value.is_cuda()" in cu and "AT_DISPATCH_FLOATING_TYPES(value.scalar_type()" in cu
    misc = (root / "util" / "misc.py").read_text()
    assert "float(torchvision" not in misc
    version = 'tuple(int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2])'
    assert f"if {version} < (0, 5):" in misc and f"elif {version} < (0, 7):" in misc
    assert eval(version.replace("torchvision.__version__", "'0.20.1+cu124'")) == (0, 20)
    assert not any(apply_fixes(FRAMEWORKS["solq"], root).values())  # idempotent


def test_solq_installs_under_its_own_name(tmp_path, monkeypatch):
    """put_on_path: a folder holding only a ``solq`` link to the checkout goes on the path (the
    checkout's parent holds the other frameworks' checkouts)."""
    import install_frameworks

    root = fake_solq(tmp_path / "solq")
    (tmp_path / "mask2former").mkdir()
    monkeypatch.setattr(install_frameworks, "site_packages", lambda: tmp_path / "site")
    monkeypatch.setattr(install_frameworks, "cuda_build", lambda: False)
    (tmp_path / "site").mkdir()
    install_frameworks.put_on_path(FRAMEWORKS["solq"], root, dry_run=False)
    entry = (tmp_path / "site" / "iuq-framework-solq.pth").read_text().strip()
    assert sorted(p.name for p in Path(entry).iterdir()) == ["solq"]
    assert (Path(entry) / "solq").resolve() == root.resolve()
    assert FRAMEWORKS["solq"].marker and (Path(entry) / "solq" / FRAMEWORKS["solq"].marker).is_dir()
