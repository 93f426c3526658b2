"""The SOTR recipes under configs/IUQ/SOTR: they load into the project's config, reproduce SOTR's
own recipes (easton-cau/SOTR @ 341ef54, configs/SOTR/*.yaml, _BASE_ merged) key for key, their
IUQ-off twins differ only where they should, and they build the right detectron2 model.

Needs SOTR's `adet` (for its MODEL.SOTR keys and meta-architecture), which lives in its own
environment (README: SOTR); skipped elsewhere. ``test_sotr_unavailable.py`` covers the rest."""
import ast
from pathlib import Path

import pytest
import yaml

pytest.importorskip("detectron2", reason="detectron2 is not importable: the YAML recipes need it")

from adelaidet_support import adet_provides  # noqa: E402

if not adet_provides("sotr"):
    pytest.skip("SOTR's `adet` is not installed here (it needs its own environment; README: SOTR)",
                allow_module_level=True)

from iuq.config import get_iuq_cfg, validate_iuq_config  # noqa: E402
from config_support import flat, norm, raw  # noqa: E402

FOLDER = Path(__file__).resolve().parents[1] / "configs" / "IUQ" / "SOTR"
RECIPES = ["R50", "R101", "R_101_DCN"]
IUQ_FILES = [f"{r}.yaml" for r in RECIPES]
ALL_FILES = sorted(p.name for p in FOLDER.glob("*.yaml"))

R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
R101 = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
BASE_INPUT = (640, 672, 704, 736, 768, 800)
LARGE_INPUT = {  # R50 and R_101_DCN: larger training scales, test at 1000
    "INPUT.MIN_SIZE_TRAIN": BASE_INPUT + (1024,),
    "INPUT.MAX_SIZE_TRAIN": 2048,
    "INPUT.MIN_SIZE_TEST": 1000,
}
SCHEDULE = {"SOLVER.STEPS": (210000, 250000), "SOLVER.MAX_ITER": 300000}

# The keys SOTR's recipes set to something other than detectron2's + SOTR's defaults (OUTPUT_DIR
# aside): /tmp/iuq_notes/merged_configs/SOTR_*.changed.txt of the project's notes.
SOTR_COMMON = {
    "MODEL.META_ARCHITECTURE": "SOTR",
    "MODEL.MASK_ON": True,
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES": ("res2", "res3", "res4", "res5"),
    "MODEL.FPN.IN_FEATURES": ("res2", "res3", "res4", "res5"),
    "DATASETS.TRAIN": ("coco_2017_train",),
    "DATASETS.TEST": ("coco_2017_val",),
    "SOLVER.IMS_PER_BATCH": 8,
    "SOLVER.BASE_LR": 0.01,
    "SOLVER.WARMUP_FACTOR": 0.01,
    "INPUT.MIN_SIZE_TRAIN": BASE_INPUT,
    "INPUT.MASK_FORMAT": "bitmask",
}
OURS = {"MODEL.IUQ.WARMUP_ITERS": 1000}  # IUQ's weights ramped as SOLOv2's (Base-SOTR.yaml says why)
RECIPE_DELTAS = {
    "R50": {"MODEL.WEIGHTS": R50, **SCHEDULE, **LARGE_INPUT},
    "R101": {"MODEL.WEIGHTS": R101, "MODEL.RESNETS.DEPTH": 101, **SCHEDULE},
    "R_101_DCN": {
        "MODEL.WEIGHTS": R101, "MODEL.RESNETS.DEPTH": 101, **SCHEDULE, **LARGE_INPUT,
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE": (False, True, True, True),
        "MODEL.RESNETS.DEFORM_MODULATED": True,
        "MODEL.RESNETS.DEFORM_INTERVAL": 3,
    },
}
PAPER_IUQ = {  # the paper's IUQ settings, which Base-SOTR.yaml spells out (as the other Bases)
    "ENABLED": True, "INTER.ENABLED": True, "INTER.LOSS": "focal", "INTER.ALPHA": 0.1,
    "INTER.GAMMA": 2.5, "MEMORY.SIZE": 100000, "MEMORY.SAMPLING": "instance",
    "MEMORY.PIXELS_PER_INSTANCE": 50, "EQUI.ENABLED": True, "EQUI.WEIGHT": 3.0,
    "EQUI.TRANSFORMS": ("flip", "crop"), "EQUI.CROP_RANGE": (0.6, 1.0), "EQUI.MODE": "full",
}


def _load(name):
    cfg = get_iuq_cfg()
    cfg.merge_from_file(str(FOLDER / name))
    return cfg


def test_every_recipe_and_twin_is_present():
    expected = {"Base-SOTR.yaml"} | set(IUQ_FILES) | {f"{r}_baseline.yaml" for r in RECIPES}
    assert set(ALL_FILES) == expected


@pytest.mark.parametrize("name", ALL_FILES)
def test_merges_validates_and_is_self_contained(name):
    cfg = _load(name)
    validate_iuq_config(cfg)
    assert cfg.MODEL.META_ARCHITECTURE == "SOTR"
    path, seen = FOLDER / name, set()
    while (base := raw(path).get("_BASE_")) is not None:  # no SOTR YAML is ever needed
        path = (path.parent / base).resolve()
        assert path.parent == FOLDER.resolve() and path.is_file(), f"{name}: _BASE_ {base} leaves configs/IUQ/SOTR"
        assert path not in seen, f"{name}: _BASE_ cycle"
        seen.add(path)
    assert path.name == "Base-SOTR.yaml"


def test_base_spells_out_the_papers_iuq_settings():
    written = raw(FOLDER / "Base-SOTR.yaml")["MODEL"]["IUQ"]
    for dotted, want in PAPER_IUQ.items():
        node = written
        for part in dotted.split("."):
            assert part in node, f"Base-SOTR.yaml does not set MODEL.IUQ.{dotted}"
            node = node[part]
        if isinstance(node, str) and node.startswith("("):
            node = ast.literal_eval(node)
        assert norm(node) == want, f"MODEL.IUQ.{dotted}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_sotrs_recipe_plus_iuq(recipe):
    got, defaults = flat(_load(f"{recipe}.yaml")), flat(get_iuq_cfg())
    expected = {**SOTR_COMMON, **RECIPE_DELTAS[recipe], **OURS}
    for key, want in expected.items():
        assert got[key] == norm(want), f"{recipe}: {key} = {got[key]!r}, SOTR's recipe has {want!r}"
    changed = {k for k in got if got[k] != defaults[k]}
    assert changed - set(expected) == {"OUTPUT_DIR"}, f"{recipe}: unexpected changes {sorted(changed - set(expected))}"
    for dotted, want in PAPER_IUQ.items():
        assert got["MODEL.IUQ." + dotted] == want, f"{recipe}: MODEL.IUQ.{dotted}"
    assert got["OUTPUT_DIR"] == f"output/iuq/sotr_{recipe}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_properties(recipe):
    from detectron2.data import DatasetCatalog

    cfg = _load(f"{recipe}.yaml")
    r101 = recipe.startswith("R101") or recipe.startswith("R_101")
    assert (cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.WEIGHTS) == ((101, R101) if r101 else (50, R50))
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (300000, (210000, 250000))
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == (0.01, 8)  # SOTR's batch, not 16
    assert len(cfg.INPUT.MIN_SIZE_TRAIN) > 1 and cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    assert cfg.INPUT.MIN_SIZE_TEST == (800 if recipe == "R101" else 1000)
    assert cfg.INPUT.MAX_SIZE_TEST == 1333 and cfg.INPUT.MASK_FORMAT == "bitmask"
    assert cfg.MODEL.SOTR.NUM_CLASSES == 80
    assert any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == (recipe == "R_101_DCN")
    registered = set(DatasetCatalog.list())
    assert set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST) <= registered


@pytest.mark.parametrize("recipe", RECIPES)
def test_baseline_twin_differs_only_in_iuq_switch_and_output_dir(recipe):
    twin = f"{recipe}_baseline.yaml"
    assert raw(FOLDER / twin)["_BASE_"] == f"{recipe}.yaml"
    a, b = (flat(yaml.safe_load(_load(n).dump())) for n in (f"{recipe}.yaml", twin))
    assert a.keys() == b.keys()
    assert {k for k in a if a[k] != b[k]} == {"MODEL.IUQ.ENABLED", "OUTPUT_DIR"}
    assert a["MODEL.IUQ.ENABLED"] is True and b["MODEL.IUQ.ENABLED"] is False
    assert b["OUTPUT_DIR"] == a["OUTPUT_DIR"].replace("output/iuq/", "output/baseline/", 1)
    validate_iuq_config(_load(twin))


@pytest.mark.parametrize("recipe, res4_blocks", [("R50", 6), ("R_101_DCN", 23)])
def test_builds_the_stock_sotr_model_with_an_adapter(recipe, res4_blocks):
    import adet.modeling  # noqa: F401  (registers SOTR)
    from detectron2.layers import ModulatedDeformConv
    from detectron2.modeling import build_model

    from iuq.adapters import adapter_class
    from iuq.adapters.grid_kernels import GridKernelAdapter

    cfg = _load(f"{recipe}.yaml")
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    model = build_model(cfg)  # builds on CPU; the DCN variant only runs on a GPU
    assert type(model).__name__ == "SOTR"
    bottom_up = model.backbone.bottom_up
    assert len(bottom_up.res4) == res4_blocks
    deformable = {s for s in ("res2", "res3", "res4", "res5")
                  if any(isinstance(m, ModulatedDeformConv) for m in getattr(bottom_up, s).modules())}
    assert deformable == (set() if recipe == "R50" else {"res3", "res4", "res5"})
    assert not any("iuq" in name.lower() for name, _ in model.named_parameters())
    adapter = adapter_class(cfg)
    assert adapter.__name__ == "SOTR" and issubclass(adapter, GridKernelAdapter)
