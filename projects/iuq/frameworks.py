"""The base frameworks IUQ trains on: where they come from, the commits our tests run against, the
fixes their checkouts need with current PyTorch, and how to tell what an environment has.

Used by ``tools/install_frameworks.py`` (which applies the fixes to a checkout) and by
``python -m iuq.collect_env`` (which detects the snags they cure). Nothing here imports
detectron2 or a framework: it must work on a machine that has neither.

None of these frameworks is on a package registry. AdelaiDet and SOTR are both the package
``adet`` (SOTR is a fork that keeps only SOTR), so an environment holds one or the other;
Mask2Former and SparseInst have no ``setup.py``: their checkout roots go on the path. SOLQ has
none either, and generic top-level names: its checkout is made the package ``solq``.
"""
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Framework:
    name: str  # the installer's argument
    url: str
    commit: str  # the commit the tests run against
    package: str  # the import name
    models: tuple  # META_ARCHITECTUREs it provides
    marker: str = ""  # a path inside the package that tells this framework from another with its name
    setup_py: bool = True  # False: installed by putting its root on the path
    fixes: tuple = field(default=())  # names of functions in FIXES, applied in order
    requires: tuple = ()  # (pip requirement, module) it imports that neither it nor detectron2 declares


# AdelaiDet, SOTR and SparseInst import cv2 without declaring it (detectron2 does not need it).
# Below 4.11: later wheels need numpy 2, which the rest of the stack (torch 2.5.1's) does not have.
OPENCV = ("opencv-python-headless<4.11", "cv2")

DETECTRON2 = Framework(
    "detectron2", "https://github.com/facebookresearch/detectron2",
    "02b5c4e295e990042a714712c21dc79b731e8833", "detectron2", (),
)

FRAMEWORKS = {
    f.name: f
    for f in (
        Framework("adelaidet", "https://github.com/aim-uofa/AdelaiDet", "36721221eb572256206e60df6e9095ed00b2e08c",
                  "adet", ("CondInst", "SOLOv2"), marker="modeling/condinst",
                  fixes=("tensor_type", "thc_removal", "data_datasets_init", "rapidfuzz_pin"), requires=(OPENCV,)),
        Framework("sotr", "https://github.com/easton-cau/SOTR", "341ef54ca0b197e76b9b6ff418906528857b10c0",
                  "adet", ("SOTR",), marker="modeling/sotr",
                  fixes=("tensor_type", "thc_removal", "data_datasets_init", "sotr_inplace_add"), requires=(OPENCV,)),
        Framework("mask2former", "https://github.com/facebookresearch/Mask2Former",
                  "9b0651c6c1d5b3af2e6da0589b719c514ec0d69a", "mask2former", ("MaskFormer",), setup_py=False),
        Framework("sparseinst", "https://github.com/hustvl/SparseInst", "a89901534dd8a2c0ca00ae885611500f2ed67060",
                  "sparseinst", ("SparseInst",), setup_py=False,
                  requires=(OPENCV, ("timm", "timm"), ("scipy", "scipy"))),
        # SOLQ: no setup.py, and its package names (models, util, datasets) are generic: the installer
        # makes its checkout the package `solq` (SOLQ_FIXES below) and puts a folder holding a
        # `solq` link to it on the path (tools/install_frameworks.py, put_on_path).
        Framework("solq", "https://github.com/megvii-research/SOLQ", "97f537ccc3284f7317c99fea1e05567df6663282",
                  "solq", ("SOLQ",), marker="models/ops", setup_py=False,
                  fixes=("solq_package", "solq_relative_imports", "solq_torchvision_version",
                         "solq_no_imagenet_download", "solq_ops_stand_in", "solq_tensor_type"),
                  requires=(OPENCV, ("scipy", "scipy"), ("matplotlib", "matplotlib"), ("PyWavelets", "pywt"),
                            ("torch-dct", "torch_dct"))),
    )
}


# --- fixes: each takes a checkout root, edits it in place, returns the files it changed (idempotent) ---

def _edit(path, transform):
    text = path.read_text()
    new = transform(text)
    if new == text:
        return []
    path.write_text(new)
    return [path]


def _csrc_files(root):
    base = Path(root) / "adet" / "layers" / "csrc"
    return sorted(p for p in base.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh"))


_DISPATCH_TYPE = re.compile(r"(AT_DISPATCH_[A-Z_]+\(\s*)([\w.>\-]+?)\.type\(\)")


def fix_tensor_type(root):
    """``Tensor::type()`` is gone from current PyTorch: ``x.type().is_cuda()`` -> ``x.is_cuda()``,
    ``AT_DISPATCH_*(x.type(), ...)`` -> ``AT_DISPATCH_*(x.scalar_type(), ...)``."""
    return [p for f in _csrc_files(root) for p in _edit(f, _tensor_type)]


def _tensor_type(text):
    text = text.replace(".type().is_cuda()", ".is_cuda()")
    return _DISPATCH_TYPE.sub(r"\1\2.scalar_type()", text)


_THC = [
    ("#include <THC/THC.h>", "#include <ATen/ceil_div.h>\n#include <ATen/cuda/Exceptions.h>"),
    ("#include <THC/THCDeviceUtils.cuh>", "#include <c10/cuda/CUDACachingAllocator.h>"),
    ("THCCeilDiv(", "at::ceil_div("),
    ("THCudaCheck(", "AT_CUDA_CHECK("),
    (".data<", ".data_ptr<"),
]
_THC_STATE = re.compile(r"^\s*THCState\s*\*\s*state\s*=.*\n", re.M)
_THC_MALLOC = re.compile(r"THCudaMalloc\(\s*state\s*,\s*")
_THC_FREE = re.compile(r"THCudaFree\(\s*state\s*,\s*")


def fix_thc_removal(root):
    """``ml_nms.cu`` uses the THC API, removed in PyTorch 1.11: ``THCCeilDiv`` -> ``at::ceil_div``,
    ``THCudaMalloc/Free(state, ...)`` -> the caching allocator's ``raw_alloc/raw_delete``,
    ``THCudaCheck`` -> ``AT_CUDA_CHECK``, ``.data<T>()`` -> ``.data_ptr<T>()``. (Only CUDA builds
    compile it.)"""
    def transform(text):
        if "THC" not in text:
            return text
        for old, new in _THC:
            text = text.replace(old, new)
        text = _THC_STATE.sub("", text)
        text = _THC_MALLOC.sub("c10::cuda::CUDACachingAllocator::raw_alloc(", text)
        return _THC_FREE.sub("c10::cuda::CUDACachingAllocator::raw_delete(", text)

    return [p for f in _csrc_files(root) if f.suffix in (".cu", ".cuh") for p in _edit(f, transform)]


def fix_data_datasets_init(root):
    """``adet/data/datasets/`` has no ``__init__.py``: a non-editable install leaves it out and
    ``import adet.data`` fails."""
    init = Path(root) / "adet" / "data" / "datasets" / "__init__.py"
    if init.exists() or not init.parent.is_dir():
        return []
    init.write_text("")
    return [init]


def fix_rapidfuzz_pin(root):
    """``adet.evaluation`` imports ``rapidfuzz.string_metric``, removed in rapidfuzz 3: pin
    ``rapidfuzz<3`` in AdelaiDet's ``install_requires``."""
    return _edit(Path(root) / "setup.py", lambda t: t.replace('"rapidfuzz",', '"rapidfuzz<3",'))


def fix_sotr_inplace_add(root):
    """SOTR's ``MaskHead.forward`` adds in place into a ReLU output autograd saved, so the first
    backward fails ("modified by an inplace operation", SOTR issue #19): write ``x = x + y``."""
    old = "feature_add_all_level += self.convs_all_levels[i](mask_feat)"
    new = "feature_add_all_level = feature_add_all_level + self.convs_all_levels[i](mask_feat)"
    return _edit(Path(root) / "adet" / "modeling" / "sotr" / "sotr.py", lambda t: t.replace(old, new))


# --- SOLQ (megvii-research/SOLQ at 97f537c) ---
# Its checkout becomes the package `solq` (a folder on the path holds a `solq` link to it), so its
# generic top-level names (models, util, datasets: the last collides with the `datasets` package of
# PyPI) never enter sys.modules: `solq.models.solq`, `solq.util.misc`.

def fix_solq_package(root):
    """SOLQ's checkout root has no ``__init__.py``: write one, so that the root is the package
    ``solq`` (its ``models`` and ``util`` then import as ``solq.models``, ``solq.util``)."""
    init = Path(root) / "__init__.py"
    if init.exists():
        return []
    init.write_text('"""SOLQ (github.com/megvii-research/SOLQ) as the package `solq`: written by iuq\'s '
                    'tools/install_frameworks.py (iuq.frameworks.fix_solq_package)."""\n')
    return [init]


# SOLQ's models import their siblings as top-level packages (it runs from its root): made relative.
_SOLQ_IMPORTS = [
    (re.compile(r"^import util\.(\w+) as (\w+)$", re.M), r"from ..util import \1 as \2"),
    (re.compile(r"^from util(\.|\s)", re.M), r"from ..util\1"),
    (re.compile(r"^from models\.", re.M), r"from ."),
]


def fix_solq_relative_imports(root):
    """``models/*.py`` import ``util.misc``, ``util.box_ops`` and ``models.ops.modules`` as
    top-level packages (SOLQ runs from its root): make them relative to the package ``solq``
    (``from ..util.misc import``, ``from .ops.modules import``), so that no top-level ``util`` or
    ``models`` is imported (or shadowed by another package of that name)."""
    def transform(text):
        for pattern, replacement in _SOLQ_IMPORTS:
            text = pattern.sub(replacement, text)
        return text

    return [p for f in sorted((Path(root) / "models").glob("*.py")) for p in _edit(f, transform)]


_TORCHVISION_FLOAT = re.compile(r"float\(torchvision\.__version__\[:3\]\) < (\d+)\.(\d+)")


def fix_solq_torchvision_version(root):
    """``util/misc.py`` compares ``float(torchvision.__version__[:3])`` with 0.5 and 0.7: torchvision
    0.20 reads as 0.2, and the import then fails on ops removed long ago. Compare (major, minor)."""
    def transform(text):
        return _TORCHVISION_FLOAT.sub(
            r'tuple(int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2]) < (\1, \2)', text)

    return _edit(Path(root) / "util" / "misc.py", transform)


def fix_solq_no_imagenet_download(root):
    """Its ResNet backbone downloads ImageNet weights in its constructor (``pretrained=is_main_process()``):
    build it without (``pretrained=False``); the weights come from ``MODEL.WEIGHTS``, as every
    detectron2 model's do (and nothing is downloaded on an offline machine)."""
    return _edit(Path(root) / "models" / "backbone.py",
                 lambda t: t.replace("pretrained=is_main_process(),", "pretrained=False,"))


SOLQ_OP_STAND_IN = "iuq_ms_deform_attn.py"
_SOLQ_OP_IMPORT = "import MultiScaleDeformableAttention as MSDA"
_SOLQ_OP_IMPORT_FIXED = "from . import iuq_ms_deform_attn as MSDA  # iuq: the compiled op on CUDA, else PyTorch"
SOLQ_OP_STAND_IN_SOURCE = '''"""Stand-in written by iuq's tools/install_frameworks.py (iuq.frameworks.fix_solq_ops_stand_in).

SOLQ's MSDeformAttnFunction always calls the compiled MultiScaleDeformableAttention op, whose CPU
kernels only raise ("Not implemented on the CPU"), and the op builds only with CUDA. Here CUDA
tensors go to the compiled op where one is built (SOLQ's, or Mask2Former's: both are Deformable
DETR's, with the same functions), everything else runs SOLQ's own ms_deform_attn_core_pytorch,
its backward by autograd through the same function.
"""
import torch

try:
    import MultiScaleDeformableAttention as _compiled

    if not hasattr(_compiled, "ms_deform_attn_forward"):  # Mask2Former's empty CPU stand-in
        _compiled = None
except ImportError:
    _compiled = None


def _core(value, spatial_shapes, sampling_loc, attn_weight):
    from .ms_deform_attn_func import ms_deform_attn_core_pytorch

    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return ms_deform_attn_core_pytorch(value, shapes, sampling_loc, attn_weight)


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step):
    if value.is_cuda and _compiled is not None:
        return _compiled.ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_loc,
                                                attn_weight, im2col_step)
    return _core(value, spatial_shapes, sampling_loc, attn_weight)


def ms_deform_attn_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, grad_output,
                            im2col_step):
    if value.is_cuda and _compiled is not None:
        return _compiled.ms_deform_attn_backward(value, spatial_shapes, level_start_index, sampling_loc,
                                                 attn_weight, grad_output, im2col_step)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (value, sampling_loc, attn_weight)]
        out = _core(inputs[0], spatial_shapes, inputs[1], inputs[2])
        return list(torch.autograd.grad(out, inputs, grad_output))
'''


def fix_solq_ops_stand_in(root):
    """SOLQ's ``MSDeformAttn`` always calls the compiled op (no PyTorch fallback, unlike
    Mask2Former's), whose CPU kernels only raise, and ``models/ops/setup.py`` refuses to build
    without CUDA. Write ``models/ops/functions/iuq_ms_deform_attn.py`` (``SOLQ_OP_STAND_IN_SOURCE``:
    CUDA tensors to the compiled op where one is built, the rest through SOLQ's own
    ``ms_deform_attn_core_pytorch``, forward and backward) and import it in place of the op."""
    functions = Path(root) / "models" / "ops" / "functions"
    stand_in = functions / SOLQ_OP_STAND_IN
    changed = []
    if not stand_in.exists() or stand_in.read_text() != SOLQ_OP_STAND_IN_SOURCE:
        stand_in.write_text(SOLQ_OP_STAND_IN_SOURCE)
        changed.append(stand_in)
    changed += _edit(functions / "ms_deform_attn_func.py",
                     lambda t: t.replace(_SOLQ_OP_IMPORT + "\n", _SOLQ_OP_IMPORT_FIXED + "\n"))
    return changed


def fix_solq_tensor_type(root):
    """The CUDA op's sources use ``Tensor::type()`` (``value.type().is_cuda()``,
    ``AT_DISPATCH_FLOATING_TYPES(value.type(), ...)``), gone from current PyTorch: the same edit as
    ``fix_tensor_type``, on ``models/ops/src``. (Only CUDA builds compile them.)"""
    base = Path(root) / "models" / "ops" / "src"
    files = sorted(p for p in base.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh"))
    return [p for f in files for p in _edit(f, _tensor_type)]


FIXES = {
    "tensor_type": fix_tensor_type,
    "solq_package": fix_solq_package,
    "solq_relative_imports": fix_solq_relative_imports,
    "solq_torchvision_version": fix_solq_torchvision_version,
    "solq_no_imagenet_download": fix_solq_no_imagenet_download,
    "solq_ops_stand_in": fix_solq_ops_stand_in,
    "solq_tensor_type": fix_solq_tensor_type,
    "thc_removal": fix_thc_removal,
    "data_datasets_init": fix_data_datasets_init,
    "rapidfuzz_pin": fix_rapidfuzz_pin,
    "sotr_inplace_add": fix_sotr_inplace_add,
}


def apply_fixes(framework, root):
    """Apply ``framework``'s fixes to the checkout at ``root``: {fix name: [files changed]}."""
    return {name: FIXES[name](root) for name in framework.fixes}


# --- what an environment has ---

def package_locations(package):
    """The directories ``import package`` could come from, in ``sys.path`` order (more than one:
    two installs shadow each other)."""
    found = []
    for entry in sys.path:
        candidate = Path(entry or ".") / package
        if (candidate / "__init__.py").is_file() and candidate.resolve() not in found:
            found.append(candidate.resolve())
    spec = find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if Path(loc).resolve() not in found:
            found.insert(0, Path(loc).resolve())
    return found


def find_spec(package):
    """``importlib.util.find_spec``, None where the name or its parent cannot be imported."""
    try:
        return importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None


def installed(framework):
    """Where ``import framework.package`` resolves, if it is *this* framework (its marker), else None."""
    spec = find_spec(framework.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    location = Path(list(spec.submodule_search_locations)[0])
    if framework.marker and not (location / framework.marker).is_dir():
        return None
    return location


def adet_flavours():
    """Which of AdelaiDet / SOTR the importable ``adet`` directories hold: [(location, name)]."""
    out = []
    for loc in package_locations("adet"):
        names = [f.name for f in FRAMEWORKS.values() if f.package == "adet" and (loc / f.marker).is_dir()]
        out.append((loc, "+".join(names) or "unknown"))
    return out


# An unpacked ``git archive`` tarball has no ``.git``: the installer records its commit here.
SOURCE_RECORD = ".iuq-source"


def git_commit(path):
    """The commit of the git checkout holding ``path``, read from ``.git`` (no git needed), or of
    the unpacked tarball holding it (its ``SOURCE_RECORD``); None where neither says."""
    for parent in [Path(path).resolve(), *Path(path).resolve().parents]:
        record = parent / SOURCE_RECORD
        if record.is_file():
            commit = record.read_text().split("\n", 1)[0].strip()
            return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None
        git = parent / ".git"
        if git.is_file():  # a worktree: "gitdir: ..."
            git = (parent / git.read_text().split(":", 1)[1].strip()).resolve()
        if not git.is_dir():
            continue
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(" ", 1)[1]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
        return None
    return None


def framework_for(model):
    """The framework that provides meta-architecture ``model``."""
    return next(f for f in FRAMEWORKS.values() if model in f.models)


def install_command(name):
    """The command that installs framework ``name`` (with detectron2) into the current environment."""
    return f"python tools/install_frameworks.py {name}"
