"""``MODEL.SOLQ``: SOLQ's own command-line options (megvii-research/SOLQ ``main.py`` at 97f537c) as
detectron2 config keys, with its R50 recipe's values (``configs/r50_solq_train.sh``: ``--meta_arch
solq --with_vector --with_box_refine --masks --batch_size 4 --vector_hidden_dim 1024
--vector_loss_coef 3`` on 8 GPUs; the rest ``main.py``'s defaults). Imports nothing of SOLQ, so
configs parse where it is not installed.

Keys of ours (not SOLQ options): ``NUM_CLASSES`` and ``CLASS_IDS`` (SOLQ hard-codes 91 classes
for COCO and trains on COCO's category ids; "dataset" keeps that, so SOLQ's released weights and
ours are the same model; "contiguous" trains ``NUM_CLASSES`` = the dataset's classes),
``SIZE_DIVISIBILITY`` (training batches are padded to a multiple of it: 64 puts every encoder
level's valid cells at ceil(size / stride), which ``L_equi``'s per-level transforms need; SOLQ
pads to the batch's largest image; inference pads as SOLQ does), ``CROP_RESIZE`` (the resize
before SOLQ's random crop, which ``INPUT.CROP`` enables) and the learning-rate multipliers, which
SOLQ gives as absolute rates (``--lr_backbone 2e-5`` = 0.1 x ``--lr 2e-4``).
"""


def add_solq_config(cfg):
    CN = type(cfg)
    cfg.MODEL.SOLQ = CN()
    s = cfg.MODEL.SOLQ
    s.NUM_CLASSES = 91  # SOLQ's build(): 91 for COCO (its category ids), 20 otherwise
    s.CLASS_IDS = "dataset"  # dataset | contiguous: the labels SOLQ's heads predict
    # --backbone, --dilation, --position_embedding, --num_feature_levels, --checkpoint, --dcn
    s.BACKBONE = "resnet50"
    s.DILATION = False
    s.POSITION_EMBEDDING = "sine"
    s.NUM_FEATURE_LEVELS = 4
    s.CHECKPOINT = False
    s.DCN = False
    # the transformer
    s.ENC_LAYERS = 6
    s.DEC_LAYERS = 6
    s.DIM_FEEDFORWARD = 1024
    s.HIDDEN_DIM = 384
    s.DROPOUT = 0.1
    s.NHEADS = 8
    s.NUM_QUERIES = 300
    s.DEC_N_POINTS = 4
    s.ENC_N_POINTS = 4
    s.ACTIVATION = "relu"
    s.WITH_BOX_REFINE = True  # r50_solq_train.sh
    s.TWO_STAGE = False
    # the mask vectors (--with_vector --masks)
    s.WITH_VECTOR = True
    s.N_KEEP = 256
    s.GT_MASK_LEN = 128
    s.VECTOR_HIDDEN_DIM = 1024  # r50_solq_train.sh (main.py: 256)
    s.VECTOR_LOSS_COEF = 3.0  # r50_solq_train.sh (main.py: 0.7)
    s.NO_VECTOR_LOSS_NORM = False
    s.VECTOR_START_STAGE = 0
    s.AUX_LOSS = True
    # the matcher and the loss weights
    s.SET_COST_CLASS = 2.0
    s.SET_COST_BBOX = 5.0
    s.SET_COST_GIOU = 2.0
    s.CLS_LOSS_COEF = 2.0
    s.BBOX_LOSS_COEF = 5.0
    s.GIOU_LOSS_COEF = 2.0
    s.FOCAL_ALPHA = 0.25
    # the optimizer's parameter groups (main.py): lr x LR_BACKBONE_MULT for names containing one of
    # LR_BACKBONE_NAMES, x LR_LINEAR_PROJ_MULT for LR_LINEAR_PROJ_NAMES; 0 freezes the backbone
    # (SOLQ: train_backbone = lr_backbone > 0)
    s.LR_BACKBONE_NAMES = ["backbone.0"]
    s.LR_BACKBONE_MULT = 0.1
    s.LR_LINEAR_PROJ_NAMES = ["reference_points", "sampling_offsets"]
    s.LR_LINEAR_PROJ_MULT = 0.1
    # input
    s.SIZE_DIVISIBILITY = 64
    s.CROP_RESIZE = (400, 500, 600)
    # SOLQ trains with AdamW (main.py), which detectron2's config has no key for; Mask2Former's and
    # SparseInst's config functions add the same key.
    if "OPTIMIZER" not in cfg.SOLVER:
        cfg.SOLVER.OPTIMIZER = "ADAMW"
    return cfg
