"""`MODEL.IUQ` configuration keys, with the paper's defaults, and their validation.

Works on any yacs/fvcore ``CfgNode`` (detectron2's ``CfgNode`` is a subclass), so the core can be
configured and tested without detectron2.
"""

INTER_LOSSES = ("focal", "l1", "l2", "ce")
# "images": whole images (encoder memories), the memory of adapters whose decode is a replay
# (memory_kind "images": SOLQ); MEMORY.SIZE then counts images.
SAMPLINGS = ("instance", "image", "dense", "images")
TRANSFORMS = ("flip", "crop", "rotation", "scale")
EQUI_MODES = ("full", "feature", "augment")
MEMORY_DTYPES = ("float32", "float16", "bfloat16")
GRAD_BOUND_ON = ("step", "momentum")  # MODEL.IUQ.INTER.GRAD_BOUND_ON
# The paper's open choices (issue 26): where its text and its Algorithm 1 (supplementary) differ
# from, or leave open, what this project first did. Each is measured, not assumed (docs/study.md).
ALPHA_WEIGHTS = ("positives", "negatives")
INTER_QUERIES = ("all", "matched_originals")
EQUI_DRAWS = ("per_image_compose", "per_batch_choice")


def add_iuq_config(cfg):
    """Add ``cfg.MODEL.IUQ`` with the defaults of Wang et al., NeurIPS 2022 (best ablation rows)."""
    CN = type(cfg)  # the caller's CfgNode class (detectron2's), or YAML merges see a type mismatch
    cfg.MODEL.IUQ = CN()
    cfg.MODEL.IUQ.ENABLED = True
    # Linear warm-up of the IUQ loss weights (loss_inter, loss_equi): factor min(1, (iter + 1) /
    # WARMUP_ITERS); 0 = none (the paper gives none). SOLOv2's kernel logits start O(10) with a
    # common part (kernels . ReLU features, all >= 0) that IUQ's losses push down at once; a mask
    # whose logits fall far below 0 has no dice gradient left (sigmoid' = 0): the masks die. The
    # SOLOv2 and SOTR recipes ramp over 1000 iterations (from a trained trunk that kept the masks
    # alive); from random initialisation a ramp lowers the risk without removing it (docs/study.md,
    # "SOLOv2's dead masks").
    cfg.MODEL.IUQ.WARMUP_ITERS = 0

    # Inter-scene uniqueness (Eq. 5): queries must not fire on other images' pixels.
    cfg.MODEL.IUQ.INTER = CN()
    cfg.MODEL.IUQ.INTER.ENABLED = True
    cfg.MODEL.IUQ.INTER.LOSS = "focal"  # focal | l1 | l2 | ce  (Table 4b)
    cfg.MODEL.IUQ.INTER.ALPHA = 0.1
    cfg.MODEL.IUQ.INTER.GAMMA = 2.5
    cfg.MODEL.IUQ.INTER.WEIGHT = 1.0
    # Memory samples decoded per chunk: bounds the loss's extra memory at one Q x CHUNK_SIZE decode
    # (CondInst: 8 hidden channels per pair). On a CPU, 512 keeps CondInst's [Q, 8, C] tensors
    # nearer the caches (1.2 s vs 1.4 s at 1024, Q = 350, 100K samples) and costs the dot
    # product nothing (measured on CPU only; a GPU may want larger chunks).
    cfg.MODEL.IUQ.INTER.CHUNK_SIZE = 512
    # The batch's own samples, used as negatives for the other images' queries: True detaches
    # them, as the paper's pseudo-code does (supplementary, Algorithm 1:
    # ``external_feats.clone().detach()``): L_inter then trains the queries only; False lets its
    # gradient reach those images' embeddings through them (this project's first behaviour).
    # Either way the memory's samples carry no gradient and the loss's value is the same.
    cfg.MODEL.IUQ.INTER.DETACH_NEGATIVES = True
    # Which side of the focal loss ALPHA weights. "positives": Lin et al.'s, fvcore's and mmdet's
    # convention, alpha on target-1 terms, so against the all-zero target every negative weighs
    # 1 - ALPHA (0.9); "negatives": ALPHA weighs the negatives (0.1, 9x weaker at ALPHA = 0.1).
    # The paper gives alpha = 0.1 without saying which (a stuff query's positives take the other).
    cfg.MODEL.IUQ.INTER.ALPHA_WEIGHTS = "positives"
    # The queries that enter L_inter. "all": every query the base model's mask loss trains
    # (CondInst: every sampled FCOS positive, ~8.5 per instance; the views' queries too when
    # views are on); "matched_originals": the original images' queries only, one per ground-truth
    # instance (CondInst: its positive with the highest FCOS centerness target; SOLOv2 / SOTR:
    # its first positive grid cell; Mask2Former / SparseInst: the matched query, already one).
    cfg.MODEL.IUQ.INTER.QUERIES = "all"
    # A bound on L_inter's influence (issue 30; iuq/inter/bound.py): where the gradient the weighted
    # loss_inter sends to the parameters that produce the queries (the query head's last layer) is
    # more than GRAD_BOUND times the base model's losses' gradient there, L_inter's whole gradient
    # is scaled down to that bound for the step. Its value is never changed, and a step where the
    # bound does not bite is the paper's step. 0 (default): off, the paper's setting. From random
    # initialisation, where the base model's logits are large on every pixel and L_inter's raw
    # gradient at the kernels is ~200x the base's (SOLOv2 R50), 0.3 kept the slim SOLOv2's masks
    # on 4 seeds of 5 where the paper's setting lost them on all 5 (docs/study.md, "A bound on
    # L_inter's influence"). Costs two partial backward passes (to that layer only) a step.
    cfg.MODEL.IUQ.INTER.GRAD_BOUND = 0.0
    # What GRAD_BOUND compares: "step", this step's gradients; "momentum", the shares of the
    # optimizer's momentum (SGD's buffer, Adam's first moment) that L_inter's and the base losses'
    # past gradients make up, i.e. what each moves the query head by. "step" let a push that kept
    # its direction build up in the momentum to more than the base losses' share and kill the masks
    # on 2 of 5 runs of the real SOLOv2 R50 from random initialisation (docs/study.md). Adds two
    # float32 buffers the size of that layer, saved in checkpoints.
    cfg.MODEL.IUQ.INTER.GRAD_BOUND_ON = "step"
    # The smallest scale the momentum bound may put on L_inter's gradient, in [-1, 0]. 0: it can
    # only stop adding to L_inter's share of the momentum. Below 0 it can take some back (this
    # step's L_inter gradient applied against itself, at most |MIN_SCALE| times), which the share
    # needs when the base losses' gradient turns and their share shrinks under it: with 0 the share
    # sat over 3x the bound on half the steps of the real SOLOv2 R50 (docs/study.md). Only with
    # GRAD_BOUND_ON "momentum" (a per-step bound carries no share to take back).
    cfg.MODEL.IUQ.INTER.GRAD_BOUND_MIN_SCALE = 0.0

    # External memory of pixel samples from past batches (a FIFO queue).
    cfg.MODEL.IUQ.MEMORY = CN()
    cfg.MODEL.IUQ.MEMORY.SIZE = 100000  # 0 = mini-batch only
    cfg.MODEL.IUQ.MEMORY.SAMPLING = "instance"  # instance | image | dense | images (SOLQ: whole images)
    cfg.MODEL.IUQ.MEMORY.PIXELS_PER_INSTANCE = 50  # "instance" sampling
    cfg.MODEL.IUQ.MEMORY.PIXELS_PER_IMAGE = 1000  # "image" sampling
    cfg.MODEL.IUQ.MEMORY.DTYPE = "float32"  # storage dtype of the embeddings

    # Transformation equivariance (Eq. 6-8).
    cfg.MODEL.IUQ.EQUI = CN()
    cfg.MODEL.IUQ.EQUI.ENABLED = True
    cfg.MODEL.IUQ.EQUI.WEIGHT = 3.0
    cfg.MODEL.IUQ.EQUI.TRANSFORMS = ("flip", "crop")  # + "rotation", "scale" (supplementary)
    cfg.MODEL.IUQ.EQUI.CROP_RANGE = (0.6, 1.0)  # relative side length of the crop
    cfg.MODEL.IUQ.EQUI.ROTATION_RANGE = (0.0, 60.0)  # degrees
    cfg.MODEL.IUQ.EQUI.SCALE_RANGE = (0.5, 2.0)
    # Table 4d. full: Eq. 8, dice(<q^g, g(F)>, g(M)); feature: feature equivariance only,
    # mean squared error between F^g and g(F) on the view's valid cells (the paper does not give
    # its exact form); augment: transformed images as plain augmentation, <q^g, F^g> (no L_equi).
    cfg.MODEL.IUQ.EQUI.MODE = "full"
    # How a view's g is drawn from TRANSFORMS. "per_batch_choice" (the paper's pseudo-code,
    # supplementary Algorithm 1: ``RandomChoice([flip, crop])``, one draw per batch): one transform
    # kind per batch, uniformly among TRANSFORMS, every image of the batch then getting that one
    # transform (a flip; a crop with its own box, the images' sizes differ); "per_image_compose"
    # (this project's first behaviour): per image, each listed transform in the order flip
    # (p = 1/2), crop, rotation, scale.
    cfg.MODEL.IUQ.EQUI.DRAW = "per_batch_choice"
    # Compute-matched views. False: every image of the batch gets a view and the step trains on
    # both, 2 x SOLVER.IMS_PER_BATCH images (about twice the baseline twin's time and activation
    # memory per iteration, the same distinct images per iteration). True: the views count toward
    # SOLVER.IMS_PER_BATCH: the loader reads IMS_PER_BATCH / 2 images and, with their views, a
    # step holds IMS_PER_BATCH images, like the baseline twin's step (its time and memory per
    # iteration), at half the distinct images per iteration (an epoch takes twice the
    # iterations). IMS_PER_BATCH must then be divisible by 2 x the number of processes.
    cfg.MODEL.IUQ.EQUI.VIEWS_IN_BATCH = False

    # Measures of what each loss optimises (iuq.evaluation.measures), computed on the test set next to
    # COCO AP when enabled (any mode, the baseline included: needs the model's adapter).
    cfg.MODEL.IUQ.MEASURES = CN()
    cfg.MODEL.IUQ.MEASURES.ENABLED = False
    cfg.MODEL.IUQ.MEASURES.SEED = 0  # the views and samples drawn (the same for every model)
    cfg.MODEL.IUQ.MEASURES.MAX_IMAGES = 128  # held-out images measured (the first N)
    cfg.MODEL.IUQ.MEASURES.PIXELS_PER_INSTANCE = 50  # instance pixels each image contributes
    cfg.MODEL.IUQ.MEASURES.QUERIES_PER_INSTANCE = 4  # matched queries measured per instance


def _fail(key, value, why):
    raise ValueError(f"Invalid config MODEL.IUQ.{key} = {value!r}: {why}")


def _check_choice(node, key, choices):
    value = _get(node, key)
    if value not in choices:
        _fail(key, value, f"must be one of {list(choices)}")


def _check_number(node, key, low=0.0, high=None, integer=False, strict=False):
    value = _get(node, key)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        _fail(key, value, "must be an integer" if integer else "must be a number")
    if value < low or (strict and value == low):
        _fail(key, value, f"must be {'>' if strict else '>='} {low}")
    if high is not None and value > high:
        _fail(key, value, f"must be <= {high}")


def _check_range(node, key, low, high, low_open=False):
    value = _get(node, key)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        _fail(key, value, "must be a pair (min, max)")
    a, b = value
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        _fail(key, value, "both ends must be numbers")
    if a > b:
        _fail(key, value, "is reversed (min > max)")
    if a < low or (low_open and a == low) or b > high:
        bracket = "(" if low_open else "["
        _fail(key, value, f"must lie within {bracket}{low}, {high}]")


def _get(node, dotted):
    for part in dotted.split("."):
        node = node[part]
    return node


def validate_iuq_config(cfg):
    """Raise ``ValueError`` naming the key and value of the first impossible ``MODEL.IUQ`` entry."""
    if "IUQ" not in cfg.MODEL:
        raise ValueError("Config has no MODEL.IUQ section: call iuq.add_iuq_config(cfg) first")
    node = cfg.MODEL.IUQ
    for key in ("ENABLED", "INTER.ENABLED", "INTER.DETACH_NEGATIVES", "EQUI.ENABLED", "EQUI.VIEWS_IN_BATCH",
                "MEASURES.ENABLED"):
        if not isinstance(_get(node, key), bool):
            _fail(key, _get(node, key), "must be True or False")

    _check_choice(node, "INTER.LOSS", INTER_LOSSES)
    _check_number(node, "INTER.ALPHA", high=1.0)
    _check_number(node, "INTER.GAMMA")
    _check_number(node, "INTER.WEIGHT")
    _check_number(node, "INTER.CHUNK_SIZE", low=0, integer=True, strict=True)
    _check_choice(node, "INTER.ALPHA_WEIGHTS", ALPHA_WEIGHTS)
    _check_choice(node, "INTER.QUERIES", INTER_QUERIES)
    _check_number(node, "INTER.GRAD_BOUND")
    _check_choice(node, "INTER.GRAD_BOUND_ON", GRAD_BOUND_ON)
    _check_number(node, "INTER.GRAD_BOUND_MIN_SCALE", low=-1.0, high=0.0)
    if node.INTER.GRAD_BOUND_MIN_SCALE < 0 and (node.INTER.GRAD_BOUND_ON != "momentum" or node.INTER.GRAD_BOUND <= 0):
        _fail("INTER.GRAD_BOUND_MIN_SCALE", node.INTER.GRAD_BOUND_MIN_SCALE,
              "below 0 takes back L_inter's share of the momentum: it needs MODEL.IUQ.INTER.GRAD_BOUND > 0 and "
              "MODEL.IUQ.INTER.GRAD_BOUND_ON momentum")
    _check_number(node, "WARMUP_ITERS", integer=True)

    _check_number(node, "MEMORY.SIZE", integer=True)
    _check_choice(node, "MEMORY.SAMPLING", SAMPLINGS)
    _check_number(node, "MEMORY.PIXELS_PER_INSTANCE", low=0, integer=True, strict=True)
    _check_number(node, "MEMORY.PIXELS_PER_IMAGE", low=0, integer=True, strict=True)
    _check_choice(node, "MEMORY.DTYPE", MEMORY_DTYPES)

    _check_number(node, "EQUI.WEIGHT")
    _check_choice(node, "EQUI.MODE", EQUI_MODES)
    _check_choice(node, "EQUI.DRAW", EQUI_DRAWS)
    transforms = node.EQUI.TRANSFORMS
    if not isinstance(transforms, (tuple, list)):
        _fail("EQUI.TRANSFORMS", transforms, "must be a list of transform names")
    for name in transforms:
        if name not in TRANSFORMS:
            _fail("EQUI.TRANSFORMS", transforms, f"unknown transform {name!r}; known: {list(TRANSFORMS)}")
    if node.EQUI.ENABLED and node.ENABLED and not transforms:
        _fail("EQUI.TRANSFORMS", transforms, "is empty while MODEL.IUQ.EQUI.ENABLED is True")
    _check_range(node, "EQUI.CROP_RANGE", 0.0, 1.0, low_open=True)
    _check_range(node, "EQUI.ROTATION_RANGE", -180.0, 180.0)
    _check_range(node, "EQUI.SCALE_RANGE", 0.0, float("inf"), low_open=True)
    _check_number(node, "MEASURES.SEED", integer=True)
    for key in ("MEASURES.MAX_IMAGES", "MEASURES.PIXELS_PER_INSTANCE", "MEASURES.QUERIES_PER_INSTANCE"):
        _check_number(node, key, low=0, integer=True, strict=True)
    return cfg


def iuq_on(cfg):
    """Whether ``cfg`` trains with either IUQ loss (``MODEL.IUQ.ENABLED`` and INTER or EQUI)."""
    iuq = cfg.MODEL.IUQ
    return bool(iuq.ENABLED and (iuq.INTER.ENABLED or iuq.EQUI.ENABLED))


def get_iuq_cfg():
    """A fresh config: detectron2's defaults, AdelaiDet's keys when AdelaiDet is installed, and
    ``MODEL.IUQ``. What ``train_net.py`` merges the YAML recipes into."""
    try:
        from adet.config import get_cfg
    except ImportError:
        from detectron2.config import get_cfg
    cfg = get_cfg()
    add_base_model_configs(cfg)
    add_iuq_config(cfg)
    # An image the training mapper fails on: False stops training naming the file and image id;
    # True skips it with a warning naming them (iuq.data.mapper). Off: nothing is lost silently.
    cfg.DATALOADER.SKIP_BAD_IMAGES = False
    return cfg


def add_base_model_configs(cfg):
    """The config keys of the installed base frameworks that have config functions: Mask2Former's
    (``MODEL.MASK_FORMER``, ``SOLVER.OPTIMIZER``, ... with DeepLab's, as its train_net adds them)
    and SparseInst's (``MODEL.SPARSE_INST``, ...). The two share some ``SOLVER`` / ``INPUT`` keys
    with different defaults, so their recipes set them. SparseInst's function also sets
    ``MODEL.DEVICE`` to cuda: the value before it is kept, so that the YAML and the command line
    decide."""
    try:
        from detectron2.projects.deeplab import add_deeplab_config
        from mask2former import add_maskformer2_config
    except ImportError:
        pass
    else:
        add_deeplab_config(cfg)
        add_maskformer2_config(cfg)
    add_solq_config_if_installed(cfg)
    try:
        from sparseinst import add_sparse_inst_config
    except ImportError:
        return
    device = cfg.MODEL.DEVICE
    add_sparse_inst_config(cfg)
    cfg.MODEL.DEVICE = device


def add_solq_config_if_installed(cfg):
    """``MODEL.SOLQ`` (``iuq.modeling.solq_config``: SOLQ's options) where SOLQ (the package
    ``solq``) is installed, as the other frameworks' keys exist only where they are."""
    from .frameworks import find_spec  # None where `solq` cannot be imported

    if find_spec("solq") is not None:
        from .modeling.solq_config import add_solq_config

        add_solq_config(cfg)
