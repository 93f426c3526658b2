"""Make detectron2's META_ARCH_REGISTRY know the base models IUQ trains, and say which package to
install where a config names a model whose package is missing.

AdelaiDet (CondInst, SOLOv2) and SOTR are both installed as the package ``adet``, so an
environment has at most one of them; a SOTR config in AdelaiDet's environment (or the reverse)
would otherwise fail deep inside yacs or detectron2's registry with no hint of the cause.
"""
import importlib
import logging
import re
from contextlib import contextmanager

from ..adapters.base import BUILTIN_ADAPTERS
from ..frameworks import framework_for, install_command

logger = logging.getLogger(__name__)

# Config nodes a base model's package adds -> the meta-architecture whose package adds them.
MODEL_CONFIG_NODES = {"CONDINST": "CondInst", "FCOS": "CondInst", "SOLOV2": "SOLOv2", "SOTR": "SOTR",
                      "SPARSE_INST": "SparseInst", "MASK_FORMER": "MaskFormer", "SOLQ": "SOLQ"}
# Meta-architecture -> the config key of its number of (thing) classes.
NUM_CLASSES_KEYS = {"CondInst": "MODEL.FCOS.NUM_CLASSES", "SOLOv2": "MODEL.SOLOV2.NUM_CLASSES",
                    "SOTR": "MODEL.SOTR.NUM_CLASSES", "SparseInst": "MODEL.SPARSE_INST.DECODER.NUM_CLASSES",
                    "MaskFormer": "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
                    "SOLQ": "MODEL.SOLQ.NUM_CLASSES"}
_MISSING_KEY = re.compile(r"Non-existent (?:config )?key: (MODEL\.([A-Z0-9_]+)[A-Z0-9_.]*)")


class BaseModelUnavailable(ImportError):
    """The package providing the config's meta-architecture is not installed here."""


def register_base_models(cfg=None):
    """Import the installed ``adet`` (AdelaiDet: CondInst, SOLOv2; or SOTR), ``sparseinst`` and
    ``mask2former``, which register their meta-architectures, and ours for SOLQ (``iuq.modeling.solq``). With ``cfg``, raise :class:`BaseModelUnavailable`
    naming the package if ``cfg.MODEL.META_ARCHITECTURE`` is one IUQ knows but detectron2's
    registry does not."""
    for module, what in (("adet.modeling", "`adet` (AdelaiDet or SOTR)"), ("sparseinst", "SparseInst"),
                         ("mask2former", "Mask2Former"), ("iuq.modeling.solq", "SOLQ (package `solq`)")):
        try:
            importlib.import_module(module)  # registers its meta-architectures
        except ImportError as e:
            logger.info("%s is not importable (%s): its meta-architectures are unavailable", what, e)
    if cfg is not None:
        require_base_model(cfg.MODEL.META_ARCHITECTURE)


def require_base_model(name):
    """Raise :class:`BaseModelUnavailable` if meta-architecture ``name`` has a known package
    (``BUILTIN_ADAPTERS``) and is not registered. Unknown names are left to detectron2."""
    from detectron2.modeling import META_ARCH_REGISTRY

    if name in BUILTIN_ADAPTERS and name not in META_ARCH_REGISTRY:
        raise BaseModelUnavailable(unavailable_message(name, f"MODEL.META_ARCHITECTURE={name!r}"))


def require_config_base_model(config_file):
    """Raise :class:`BaseModelUnavailable` if the YAML ``config_file`` (with its ``_BASE_`` chain)
    names a meta-architecture IUQ knows whose package is not installed: before merging it, so the
    error names the package instead of the first key its config function would have added."""
    from detectron2.config import CfgNode

    name = (CfgNode.load_yaml_with_base(config_file, allow_unsafe=True).get("MODEL") or {}).get("META_ARCHITECTURE")
    register_base_models()
    if name:
        require_base_model(name)


def unavailable_message(name, what):
    package = BUILTIN_ADAPTERS[name][1]
    framework = framework_for(name)
    if framework.package != "adet":
        return (f"{what} needs the {name} meta-architecture, provided by {package}, which is not installed here "
                f"({_which(framework.package)}). Install it with `{install_command(framework.name)}` "
                "(README: Install).")
    return (
        f"{what} needs the {name} meta-architecture, provided by {package}, which is not installed "
        f"here ({_which_adet()}). Install it with `{install_command(framework.name)}` (in an environment of its "
        "own where the other `adet` is installed: AdelaiDet and SOTR are both the package `adet` and cannot "
        "share an environment; README: Install)."
    )


def _which(package):
    try:
        importlib.import_module(package)
    except ImportError as e:
        return f"`import {package}` fails: {e}"
    return f"`{package}` imports but registers no {package} meta-architecture"


def _which_adet():
    try:
        import adet.modeling as modeling
    except ImportError as e:
        return f"`import adet.modeling` fails: {e}"
    from detectron2.modeling import META_ARCH_REGISTRY

    names = sorted(n for n in BUILTIN_ADAPTERS if n in META_ARCH_REGISTRY)
    return f"the `adet` here, {modeling.__file__.rsplit('/modeling', 1)[0]}, provides {names}"


@contextmanager
def base_model_config_errors(cfg):
    """Around merges into ``cfg``: turn yacs' "Non-existent (config) key: MODEL.SOTR..." (a YAML
    or override for a model whose package, hence whose config node, is missing from ``cfg``) into
    :class:`BaseModelUnavailable`. A typo inside a node that exists stays yacs' error."""
    try:
        yield
    except (KeyError, AssertionError) as e:  # merge_from_file: KeyError; merge_from_list: assert
        match = _MISSING_KEY.search(str(e))
        if match is None or match.group(2) not in MODEL_CONFIG_NODES or match.group(2) in cfg.MODEL:
            raise
        name = MODEL_CONFIG_NODES[match.group(2)]
        raise BaseModelUnavailable(unavailable_message(name, f"Config key {match.group(1)}")) from e


def check_num_classes(cfg, dataset_dicts, names):
    """Fail before training, naming the key, if the model has fewer classes than the training data
    uses (e.g. an LVIS v1 run, 1203 classes, with a config left at COCO's 80: the IUQ authors' own
    LVIS YAML did that). The models would index past their class axis at the first step (on a GPU,
    a device-side assert that names nothing). ``names``: the DATASETS.TRAIN the dicts were read
    from. Meta-architectures not in ``NUM_CLASSES_KEYS`` are not checked."""
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    configured = cfg
    for part in key.split(".") if key else ("",):
        configured = configured.get(part) if isinstance(configured, dict) else None
    if not isinstance(configured, int):
        return
    used = max((a["category_id"] for d in dataset_dicts for a in d.get("annotations", ())), default=-1) + 1
    if used <= configured:
        return
    from detectron2.data import MetadataCatalog

    counts = {n: len(MetadataCatalog.get(n).get("thing_classes") or ()) for n in names}
    listed = ", ".join(f"{n!r}: {c} classes" for n, c in counts.items() if c)
    raise ValueError(
        f"{key} is {configured}, but DATASETS.TRAIN {tuple(names)} uses class ids up to {used - 1}"
        f"{f' ({listed})' if listed else ''}: set {key} {max([used, *counts.values()])}"
    )
