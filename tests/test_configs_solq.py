"""configs/IUQ/SOLQ against SOLQ's own R50 recipe, key for key: every option of its ``main.py``
argparse (read from the installed checkout, with ``configs/r50_solq_train.sh``'s flags on top) is
either a key of ours with the same value, or listed here as one that does not apply (paths,
launch, logging). Also the twin. The recipe test skips where SOLQ is not installed."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "IUQ" / "SOLQ"
GPUS = 8  # r50_solq_train.sh: --nproc_per_node=8
ITERS_PER_EPOCH = 118287 // GPUS // 4  # COCO train2017, each rank's DistributedSampler share, drop_last

# SOLQ option -> (our key, how our value reads as SOLQ's)
SAME = lambda v: v  # noqa: E731
KEYS = {
    "lr": ("SOLVER.BASE_LR", SAME),
    "lr_backbone": (("SOLVER.BASE_LR", "MODEL.SOLQ.LR_BACKBONE_MULT"), lambda a, b: a * b),
    "lr_backbone_names": ("MODEL.SOLQ.LR_BACKBONE_NAMES", list),
    "lr_linear_proj_names": ("MODEL.SOLQ.LR_LINEAR_PROJ_NAMES", list),
    "lr_linear_proj_mult": ("MODEL.SOLQ.LR_LINEAR_PROJ_MULT", SAME),
    "batch_size": ("SOLVER.IMS_PER_BATCH", lambda v: v // GPUS),
    "weight_decay": ("SOLVER.WEIGHT_DECAY", SAME),
    "epochs": ("SOLVER.MAX_ITER", lambda v: v / ITERS_PER_EPOCH),
    "lr_drop": ("SOLVER.STEPS", lambda v: tuple(s / ITERS_PER_EPOCH for s in v)[0]),
    "save_period": ("SOLVER.CHECKPOINT_PERIOD", lambda v: v / ITERS_PER_EPOCH),
    "clip_max_norm": ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", SAME),
    "sgd": ("SOLVER.OPTIMIZER", lambda v: v == "SGD"),
    "masks": ("MODEL.SOLQ.WITH_VECTOR", SAME),  # the wrapper always trains the mask vectors
    "aux_loss": ("MODEL.SOLQ.AUX_LOSS", SAME),
    "seed": ("SEED", SAME),
    "num_workers": ("DATALOADER.NUM_WORKERS", SAME),
    "meta_arch": ("MODEL.META_ARCHITECTURE", str.lower),
}
for name in ("with_box_refine", "two_stage", "with_vector", "n_keep", "gt_mask_len", "vector_loss_coef",
             "vector_hidden_dim", "no_vector_loss_norm", "activation", "checkpoint", "vector_start_stage", "dcn",
             "backbone", "dilation", "position_embedding", "num_feature_levels", "enc_layers", "dec_layers",
             "dim_feedforward", "hidden_dim", "dropout", "nheads", "num_queries", "dec_n_points", "enc_n_points",
             "set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef", "bbox_loss_coef",
             "giou_loss_coef", "focal_alpha"):
    KEYS[name] = (f"MODEL.SOLQ.{name.upper()}", SAME)
# Options that do not configure the model or its training: paths, launch, evaluation switches, and
# those SOLQ's build never reads (mask/dice coefficients: DETR's mask head, absent from SOLQ;
# loss_type, alg, position_embedding_scale; lr_drop_epochs: its StepLR ignores it).
NOT_APPLICABLE = {
    "frozen_weights", "pretrained", "dataset_file", "coco_path", "coco_panoptic_path", "remove_difficult",
    "output_dir", "device", "resume", "start_epoch", "eval", "test", "cache_mode", "dist_backend", "dist_url",
    "rank", "gpu", "num_machines", "mask_loss_coef", "dice_loss_coef", "loss_type", "alg",
    "position_embedding_scale", "lr_drop_epochs",
}


def solq_defaults(main_py, train_sh):
    """SOLQ's options: ``main.py``'s argparse defaults, then ``r50_solq_train.sh``'s flags."""
    options, flags = {}, {}
    for node in ast.walk(ast.parse(main_py.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        flag = node.args[0].value
        kw = {k.arg: k.value for k in node.keywords}
        dest = kw["dest"].value if "dest" in kw else flag.lstrip("-").replace("-", "_")
        action = kw["action"].value if "action" in kw else None
        if action == "store_true":
            default = False if "default" not in kw else ast.literal_eval(kw["default"])
        elif action == "store_false":
            default = True
        elif "default" in kw:
            try:
                default = ast.literal_eval(kw["default"])
            except ValueError:  # an expression (--position_embedding_scale 2 * np.pi)
                default = ast.unparse(kw["default"])
        else:
            default = None
        options[dest] = default
        flags[flag] = (dest, action)
    words = train_sh.read_text().replace("\\", " ").split()  # its lines end in backslashes, the last one too
    for i, word in enumerate(words):
        if word in flags and word != "--output_dir":
            dest, action = flags[word]
            if action == "store_true":
                options[dest] = True
            elif action == "store_false":
                options[dest] = False
            else:
                value = words[i + 1]
                options[dest] = type(options[dest])(value) if options[dest] is not None else value
    return options


def _load(name):
    from iuq.config import get_iuq_cfg

    cfg = get_iuq_cfg()
    cfg.merge_from_file(str(CONFIGS / name))
    return cfg


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _solq_checkout():
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see README)")
    from iuq.frameworks import FRAMEWORKS, installed

    where = installed(FRAMEWORKS["solq"])
    if where is None:
        pytest.skip("SOLQ (package solq) is not installed (python tools/install_frameworks.py solq; docs/install.md)")
    return where


def test_recipe_is_solqs_r50_recipe_key_for_key():
    root = _solq_checkout()
    theirs = solq_defaults(root / "main.py", root / "configs" / "r50_solq_train.sh")
    unmapped = set(theirs) - set(KEYS) - NOT_APPLICABLE
    assert not unmapped, f"SOLQ options neither mapped nor listed as not applicable: {sorted(unmapped)}"
    cfg = _load("R50.yaml")
    for option, (key, read) in KEYS.items():
        got = read(*(_get(cfg, k) for k in key)) if isinstance(key, tuple) else read(_get(cfg, key))
        want = theirs[option]
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, (option, key, got, want)
    # what the shell script changes, stated: 4 images x 8 GPUs, the mask vectors with box refinement
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER / ITERS_PER_EPOCH) == (32, 2e-4, 50)
    assert cfg.SOLVER.STEPS[0] / ITERS_PER_EPOCH == 40 and cfg.SOLVER.WARMUP_ITERS == 0
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model" and cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    # its augmentation (datasets/coco.py make_coco_transforms) and evaluation size
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert (cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (1333, 800, 1333)
    assert tuple(cfg.MODEL.SOLQ.CROP_RESIZE) == (400, 500, 600) and tuple(cfg.INPUT.CROP.SIZE) == (384, 600)
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    # SOLQ's heads for COCO: 91 outputs over COCO's category ids
    assert (cfg.MODEL.SOLQ.NUM_CLASSES, cfg.MODEL.SOLQ.CLASS_IDS) == (91, "dataset")


def test_recipe_is_self_contained_and_sets_the_papers_iuq():
    _solq_checkout()
    from iuq.config import validate_iuq_config

    raw = (CONFIGS / "R50.yaml").read_text()
    assert "_BASE_" not in raw
    cfg = _load("R50.yaml")
    validate_iuq_config(cfg)
    iuq = cfg.MODEL.IUQ
    assert (iuq.INTER.LOSS, iuq.INTER.ALPHA, iuq.INTER.GAMMA, iuq.EQUI.WEIGHT) == ("focal", 0.1, 2.5, 3.0)
    assert tuple(iuq.EQUI.TRANSFORMS) == ("flip", "crop") and tuple(iuq.EQUI.CROP_RANGE) == (0.6, 1.0)
    assert iuq.MEMORY.SAMPLING == "images" and iuq.MEMORY.SIZE == 32


def test_baseline_twin_differs_only_in_the_iuq_switch_and_output_dir():
    _solq_checkout()
    import yaml

    from config_support import flat

    a, b = (flat(yaml.safe_load(_load(n).dump())) for n in ("R50.yaml", "R50_baseline.yaml"))
    assert {k for k in a if a[k] != b[k]} == {"MODEL.IUQ.ENABLED", "OUTPUT_DIR"}
    assert b["OUTPUT_DIR"] == a["OUTPUT_DIR"].replace("output/iuq/", "output/baseline/")
