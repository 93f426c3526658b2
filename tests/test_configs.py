"""The YAML recipes under configs/IUQ: they load into the project's config, they reproduce
AdelaiDet's recipes key for key, their IUQ-off twins differ only where they should, and the two
reference recipes build the right detectron2 model."""
import ast
from pathlib import Path

import pytest
import yaml

pytest.importorskip("detectron2", reason="detectron2 is not importable: the YAML recipes need it")
pytest.importorskip("adet", reason="AdelaiDet (`adet`) is not importable: the YAML recipes need its config keys")

from adelaidet_support import adet_provides  # noqa: E402

if not adet_provides("condinst"):  # SOTR's package is also named adet
    pytest.skip("the `adet` here is not AdelaiDet: these recipes need its config keys", allow_module_level=True)

from iuq.config import get_iuq_cfg, validate_iuq_config  # noqa: E402
from config_support import flat, norm, raw  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "IUQ"
FAMILIES = {"CondInst": "CondInst", "SOLOv2": "SOLOv2"}  # config folder -> META_ARCHITECTURE
BASE_FILES = {"CondInst": "Base-CondInst.yaml", "SOLOv2": "Base-SOLOv2.yaml"}
RECIPES = {
    "CondInst": ["MS_R_50_1x", "MS_R_101_1x", "MS_R_50_3x", "MS_R_101_3x"],
    "SOLOv2": ["R50_1x", "R101_1x", "R50_3x", "R101_3x", "R50_3x_lvis"],
}
ALL_FILES = sorted(p.relative_to(CONFIGS).as_posix() for f in FAMILIES for p in (CONFIGS / f).glob("*.yaml"))
RECIPE_FILES = [p for p in ALL_FILES if not Path(p).name.startswith("Base-")]
IUQ_RECIPE_FILES = [p for p in RECIPE_FILES if not p.endswith("_baseline.yaml")]

R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
R101 = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
SCHEDULE_1X = {"SOLVER.STEPS": (60000, 80000), "SOLVER.MAX_ITER": 90000}
SCHEDULE_3X = {"SOLVER.STEPS": (210000, 250000), "SOLVER.MAX_ITER": 270000}

# The keys AdelaiDet's recipes (aim-uofa/AdelaiDet @ 36721221, configs/<Model>/*.yaml, _BASE_ chain
# merged) set to something other than detectron2's + AdelaiDet's defaults. OUTPUT_DIR aside.
ADELAIDET_COMMON = {
    "CondInst": {
        "MODEL.META_ARCHITECTURE": "CondInst",
        "MODEL.MASK_ON": True,
        "MODEL.BACKBONE.NAME": "build_fcos_resnet_fpn_backbone",
        "MODEL.RESNETS.OUT_FEATURES": ("res3", "res4", "res5"),
        "MODEL.FPN.IN_FEATURES": ("res3", "res4", "res5"),
        "MODEL.PROPOSAL_GENERATOR.NAME": "FCOS",
        "MODEL.FCOS.THRESH_WITH_CTR": True,
        "MODEL.CONDINST.MAX_PROPOSALS": 500,
        "DATASETS.TRAIN": ("coco_2017_train",),
        "DATASETS.TEST": ("coco_2017_val",),
        "SOLVER.BASE_LR": 0.01,
        "INPUT.MIN_SIZE_TRAIN": (640, 672, 704, 736, 768, 800),
    },
    "SOLOv2": {
        "MODEL.META_ARCHITECTURE": "SOLOv2",
        "MODEL.MASK_ON": True,
        "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
        "MODEL.RESNETS.OUT_FEATURES": ("res2", "res3", "res4", "res5"),
        "MODEL.FPN.IN_FEATURES": ("res2", "res3", "res4", "res5"),
        "DATASETS.TRAIN": ("coco_2017_train",),
        "DATASETS.TEST": ("coco_2017_val",),
        "SOLVER.BASE_LR": 0.01,
        "SOLVER.WARMUP_FACTOR": 0.01,
        "INPUT.MIN_SIZE_TRAIN": (640, 672, 704, 736, 768, 800),
        "INPUT.MASK_FORMAT": "bitmask",
    },
}
LVIS = {  # AdelaiDet has no LVIS recipe: R50_3x on LVIS v1 with detectron2's LVIS conventions.
    "DATASETS.TRAIN": ("lvis_v1_train",),
    "DATASETS.TEST": ("lvis_v1_val",),
    "MODEL.SOLOV2.NUM_CLASSES": 1203,
    "MODEL.SOLOV2.MAX_PER_IMG": 300,
    "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler",
    "DATALOADER.REPEAT_THRESHOLD": 0.001,
    "TEST.DETECTIONS_PER_IMAGE": 300,
}
# Ours, on top of AdelaiDet's recipe and the paper's IUQ settings: SOLOv2's IUQ weights ramp in
# over the lr's warm-up (docs/study.md, "SOLOv2's dead masks").
OURS = {"CondInst": {}, "SOLOv2": {"MODEL.IUQ.WARMUP_ITERS": 1000}}
RECIPE_DELTAS = {
    "CondInst/MS_R_50_1x": {"MODEL.WEIGHTS": R50, **SCHEDULE_1X},
    "CondInst/MS_R_101_1x": {"MODEL.WEIGHTS": R101, "MODEL.RESNETS.DEPTH": 101, **SCHEDULE_1X},
    "CondInst/MS_R_50_3x": {"MODEL.WEIGHTS": R50, **SCHEDULE_3X},
    "CondInst/MS_R_101_3x": {"MODEL.WEIGHTS": R101, "MODEL.RESNETS.DEPTH": 101, **SCHEDULE_3X},
    "SOLOv2/R50_1x": {"MODEL.WEIGHTS": R50, **SCHEDULE_1X},  # = AdelaiDet's Base-SOLOv2 + weights
    "SOLOv2/R101_1x": {"MODEL.WEIGHTS": R101, "MODEL.RESNETS.DEPTH": 101, **SCHEDULE_1X},
    "SOLOv2/R50_3x": {"MODEL.WEIGHTS": R50, **SCHEDULE_3X},
    "SOLOv2/R101_3x": {"MODEL.WEIGHTS": R101, "MODEL.RESNETS.DEPTH": 101, **SCHEDULE_3X},
    "SOLOv2/R50_3x_lvis": {"MODEL.WEIGHTS": R50, **SCHEDULE_3X, **LVIS},
}

# The paper's IUQ settings, which the Base files spell out.
PAPER_IUQ = {
    "ENABLED": True,
    "INTER.ENABLED": True,
    "INTER.LOSS": "focal",
    "INTER.ALPHA": 0.1,
    "INTER.GAMMA": 2.5,
    "MEMORY.SIZE": 100000,
    "MEMORY.SAMPLING": "instance",
    "MEMORY.PIXELS_PER_INSTANCE": 50,
    "EQUI.ENABLED": True,
    "EQUI.WEIGHT": 3.0,
    "EQUI.TRANSFORMS": ("flip", "crop"),
    "EQUI.CROP_RANGE": (0.6, 1.0),
    "EQUI.MODE": "full",
}


def _load(rel):
    cfg = get_iuq_cfg()
    cfg.merge_from_file(str(CONFIGS / rel))
    return cfg


def test_every_recipe_and_twin_is_present():
    for family, recipes in RECIPES.items():
        names = {p.name for p in (CONFIGS / family).glob("*.yaml")}
        expected = {BASE_FILES[family]} | {f"{r}.yaml" for r in recipes} | {f"{r}_baseline.yaml" for r in recipes}
        assert expected <= names, f"missing under configs/IUQ/{family}: {sorted(expected - names)}"
    # Every IUQ recipe has a twin, also ones added later.
    for rel in IUQ_RECIPE_FILES:
        assert rel[: -len(".yaml")] + "_baseline.yaml" in ALL_FILES, f"{rel} has no _baseline twin"
    assert set(RECIPE_DELTAS) == {p[: -len(".yaml")] for p in IUQ_RECIPE_FILES}


@pytest.mark.parametrize("rel", ALL_FILES)
def test_merges_validates_and_is_self_contained(rel):
    family = rel.split("/")[0]
    cfg = _load(rel)
    validate_iuq_config(cfg)
    assert cfg.MODEL.META_ARCHITECTURE == FAMILIES[family]
    # The _BASE_ chain stays inside our own folder (AdelaiDet's YAMLs are not installed).
    path = CONFIGS / rel
    seen = set()
    while True:
        base = raw(path).get("_BASE_")
        if base is None:
            break
        path = (path.parent / base).resolve()
        assert path.parent == (CONFIGS / family).resolve() and path.is_file(), f"{rel}: _BASE_ {base} leaves configs/IUQ/{family}"
        assert path not in seen, f"{rel}: _BASE_ cycle"
        seen.add(path)
    assert path.name == BASE_FILES[family], f"{rel}: chain must end at {BASE_FILES[family]}, ends at {path.name}"


@pytest.mark.parametrize("family", sorted(BASE_FILES))
def test_base_files_spell_out_the_papers_iuq_settings(family):
    written = raw(CONFIGS / family / BASE_FILES[family])
    for dotted, want in PAPER_IUQ.items():
        node = written["MODEL"]["IUQ"]
        for part in dotted.split("."):
            assert part in node, f"{BASE_FILES[family]} does not set MODEL.IUQ.{dotted}"
            node = node[part]
        if isinstance(node, str) and node.startswith("("):
            node = ast.literal_eval(node)
        assert norm(node) == want, f"MODEL.IUQ.{dotted}"


@pytest.mark.parametrize("rel", IUQ_RECIPE_FILES)
def test_recipe_is_adelaidets_recipe_plus_iuq(rel):
    family, name = rel[: -len(".yaml")].split("/")
    cfg = _load(rel)
    got = flat(cfg)
    defaults = flat(get_iuq_cfg())
    expected = {**ADELAIDET_COMMON[family], **RECIPE_DELTAS[f"{family}/{name}"], **OURS[family]}
    for key, want in expected.items():
        assert got[key] == norm(want), f"{rel}: {key} = {got[key]!r}, AdelaiDet's recipe has {want!r}"
    # Nothing else moved away from the defaults (pinned defaults are fine), except OUTPUT_DIR.
    changed = {k for k in got if got[k] != defaults[k]}
    assert changed - set(expected) == {"OUTPUT_DIR"}, f"{rel}: unexpected changes {sorted(changed - set(expected))}"
    # The paper's IUQ settings are in force.
    for dotted, want in PAPER_IUQ.items():
        assert got["MODEL.IUQ." + dotted] == want, f"{rel}: MODEL.IUQ.{dotted}"
    assert cfg.OUTPUT_DIR == f"output/iuq/{family.lower()}_{name}"


@pytest.mark.parametrize("rel", RECIPE_FILES)
def test_recipe_properties(rel):
    from detectron2.data import DatasetCatalog

    family, name = rel[: -len(".yaml")].split("/")
    cfg = _load(rel)
    r101 = "R_101" in name or "R101" in name
    assert cfg.MODEL.RESNETS.DEPTH == (101 if r101 else 50)
    assert cfg.MODEL.WEIGHTS == (R101 if r101 else R50)
    schedule = SCHEDULE_3X if "_3x" in name else SCHEDULE_1X
    assert "_3x" in name or "_1x" in name
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (schedule["SOLVER.MAX_ITER"], schedule["SOLVER.STEPS"])
    # The paper's recipe: SGD lr 0.01, batch 16, multi-scale training, test at 1333x800.
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == (0.01, 16)
    assert len(cfg.INPUT.MIN_SIZE_TRAIN) > 1 and cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    if family == "SOLOv2":
        assert cfg.INPUT.MASK_FORMAT == "bitmask"
    if "lvis" in name:
        assert cfg.MODEL.SOLOV2.NUM_CLASSES == 1203
        assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (("lvis_v1_train",), ("lvis_v1_val",))
        assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
        assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
    else:
        assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (("coco_2017_train",), ("coco_2017_val",))
        classes = cfg.MODEL.SOLOV2.NUM_CLASSES if family == "SOLOv2" else cfg.MODEL.FCOS.NUM_CLASSES
        assert classes == 80
    registered = set(DatasetCatalog.list())
    for dataset in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        assert dataset in registered, f"{rel}: dataset {dataset} is not registered in detectron2"


@pytest.mark.parametrize("rel", IUQ_RECIPE_FILES)
def test_baseline_twin_differs_only_in_iuq_switch_and_output_dir(rel):
    twin = rel[: -len(".yaml")] + "_baseline.yaml"
    assert raw(CONFIGS / twin)["_BASE_"] == Path(rel).name
    recipe, baseline = _load(rel), _load(twin)
    a, b = flat(yaml.safe_load(recipe.dump())), flat(yaml.safe_load(baseline.dump()))
    assert a.keys() == b.keys()
    assert {k for k in a if a[k] != b[k]} == {"MODEL.IUQ.ENABLED", "OUTPUT_DIR"}
    assert recipe.MODEL.IUQ.ENABLED is True and baseline.MODEL.IUQ.ENABLED is False
    validate_iuq_config(baseline)
    assert recipe.OUTPUT_DIR.startswith("output/iuq/")
    assert baseline.OUTPUT_DIR == recipe.OUTPUT_DIR.replace("output/iuq/", "output/baseline/", 1)


@pytest.mark.parametrize("rel, arch", [("CondInst/MS_R_50_1x.yaml", "CondInst"), ("SOLOv2/R50_1x.yaml", "SOLOv2")])
def test_builds_the_base_model(rel, arch):
    import adet.modeling  # noqa: F401  (registers CondInst / SOLOv2 and the FCOS backbone)
    from detectron2.modeling import build_model

    cfg = _load(rel)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    assert type(model).__name__ == arch
    assert len(model.backbone.bottom_up.res4) == 6  # ResNet-50: 3-4-6-3 blocks
    assert not any("iuq" in name.lower() for name, _ in model.named_parameters())
