"""MODEL.IUQ keys: the paper's defaults, and every impossible value rejected with its key named."""
import pytest
from fvcore.common.config import CfgNode as CN

from iuq.config import add_iuq_config, validate_iuq_config


def make_cfg():
    cfg = CN()
    cfg.MODEL = CN()
    add_iuq_config(cfg)
    return cfg


def test_defaults_are_the_papers():
    iuq = make_cfg().MODEL.IUQ
    assert iuq.ENABLED and iuq.INTER.ENABLED and iuq.EQUI.ENABLED
    assert (iuq.INTER.LOSS, iuq.INTER.ALPHA, iuq.INTER.GAMMA) == ("focal", 0.1, 2.5)
    assert (iuq.MEMORY.SIZE, iuq.MEMORY.SAMPLING, iuq.MEMORY.PIXELS_PER_INSTANCE) == (100000, "instance", 50)
    assert iuq.EQUI.WEIGHT == 3.0 and tuple(iuq.EQUI.TRANSFORMS) == ("flip", "crop")
    assert tuple(iuq.EQUI.CROP_RANGE) == (0.6, 1.0) and iuq.EQUI.MODE == "full"
    assert iuq.INTER.GRAD_BOUND == 0.0 and iuq.INTER.GRAD_BOUND_ON == "step"  # not in the paper: off
    validate_iuq_config(make_cfg())


def test_yaml_style_overrides_pass():
    cfg = make_cfg()
    cfg.merge_from_list(["MODEL.IUQ.MEMORY.SIZE", "0", "MODEL.IUQ.INTER.LOSS", "l2",
                         "MODEL.IUQ.EQUI.TRANSFORMS", "('flip', 'crop', 'rotation', 'scale')"])
    validate_iuq_config(cfg)


INVALID = [
    ("ENABLED", "yes"),
    ("INTER.ENABLED", 1),
    ("INTER.LOSS", "hinge"),
    ("INTER.ALPHA", -0.1),
    ("INTER.ALPHA", 1.5),
    ("INTER.GAMMA", -1.0),
    ("INTER.WEIGHT", -2.0),
    ("INTER.WEIGHT", "1"),
    ("INTER.CHUNK_SIZE", 0),
    ("INTER.GRAD_BOUND", -0.3),
    ("INTER.GRAD_BOUND_ON", "adam"),
    ("INTER.GRAD_BOUND_MIN_SCALE", 0.5),
    ("INTER.GRAD_BOUND_MIN_SCALE", -2.0),
    ("MEMORY.SIZE", -1),
    ("MEMORY.SIZE", 10.5),
    ("MEMORY.SAMPLING", "sparse"),
    ("MEMORY.PIXELS_PER_INSTANCE", 0),
    ("MEMORY.PIXELS_PER_IMAGE", -5),
    ("MEMORY.DTYPE", "int8"),
    ("EQUI.ENABLED", "true"),
    ("EQUI.WEIGHT", -3.0),
    ("EQUI.MODE", "partial"),
    ("EQUI.TRANSFORMS", ("flip", "shear")),
    ("EQUI.TRANSFORMS", ()),
    ("EQUI.TRANSFORMS", "flip"),
    ("EQUI.CROP_RANGE", (0.0, 1.0)),
    ("EQUI.CROP_RANGE", (0.6, 1.2)),
    ("EQUI.CROP_RANGE", (0.9, 0.6)),
    ("EQUI.CROP_RANGE", (0.6,)),
    ("EQUI.ROTATION_RANGE", (60.0, 0.0)),
    ("EQUI.SCALE_RANGE", (0.0, 2.0)),
]


@pytest.mark.parametrize("key,value", INVALID)
def test_invalid_value_is_rejected_naming_key_and_value(key, value):
    cfg = make_cfg()
    node = cfg.MODEL.IUQ
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError) as err:
        validate_iuq_config(cfg)
    assert f"MODEL.IUQ.{key}" in str(err.value)
    assert repr(value) in str(err.value)


def test_missing_section_is_named():
    cfg = CN()
    cfg.MODEL = CN()
    with pytest.raises(ValueError, match="MODEL.IUQ"):
        validate_iuq_config(cfg)


@pytest.mark.parametrize("bound, on", [(0.3, "step"), (0.0, "momentum")])
def test_a_scale_below_zero_needs_the_momentum_bound(bound, on):
    """GRAD_BOUND_MIN_SCALE < 0 takes back L_inter's share of the momentum: without a momentum bound
    (GRAD_BOUND_ON step, or the bound off) there is none, and the error names the keys to set."""
    cfg = make_cfg()
    cfg.MODEL.IUQ.INTER.GRAD_BOUND, cfg.MODEL.IUQ.INTER.GRAD_BOUND_ON = bound, on
    cfg.MODEL.IUQ.INTER.GRAD_BOUND_MIN_SCALE = -0.5
    with pytest.raises(ValueError, match="GRAD_BOUND_MIN_SCALE.*GRAD_BOUND > 0 and MODEL.IUQ.INTER.GRAD_BOUND_ON momentum"):
        validate_iuq_config(cfg)
    cfg.MODEL.IUQ.INTER.GRAD_BOUND, cfg.MODEL.IUQ.INTER.GRAD_BOUND_ON = 0.3, "momentum"
    validate_iuq_config(cfg)
