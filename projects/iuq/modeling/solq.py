"""SOLQ (megvii-research/SOLQ, "SOLQ: Segmenting Objects by Learning Queries") on detectron2's
launcher, the pattern of DETR's own ``d2/`` wrapper: META_ARCHITECTURE ``SOLQ`` builds SOLQ's own
model and criterion (``solq.models.solq.build``) from ``MODEL.SOLQ`` (``solq_config.py``), maps
detectron2's batched inputs and instances to its ``NestedTensor`` and targets, returns its weighted
losses (its logging-only ``class_error`` / ``cardinality_error`` dropped, as its
``train_one_epoch`` drops them) and, at inference, its own ``PostProcess`` (top 100, the IDCT of
each mask vector pasted into its box) as detectron2 ``Instances`` for ``COCOEvaluator``.

Weights: the wrapper registers SOLQ's top-level modules as its own children under their own names
(``backbone``, ``transformer``, ``class_embed``, ...) and keeps SOLQ's model object outside its
modules, so ``state_dict()`` keys are SOLQ's, one for one: a checkpoint of ours loads into stock
SOLQ with ``strict=True`` and SOLQ's released ``checkpoint.pth`` (``{"model": ...}``) loads as
``MODEL.WEIGHTS``. ImageNet weights for a fresh run: torchvision's ResNet-50 checkpoint with
``?matching_heuristics=True`` (detectron2 matches ``layer1.0.conv1.weight`` to
``backbone.0.body.layer1.0.conv1.weight`` by suffix); SOLQ's constructor downloads nothing
(``iuq.frameworks.fix_solq_no_imagenet_download``).
"""
import argparse
import copy
import logging
import math

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from solq.models.solq import PostProcess
from solq.models.solq import build as build_solq
from solq.util.box_ops import box_xyxy_to_cxcywh
from solq.util.misc import NestedTensor
from torch import nn

from ..data.batch import instance_bitmasks

logger = logging.getLogger(__name__)

CLASS_IDS = ("dataset", "contiguous")


def solq_args(cfg):
    """SOLQ's ``argparse.Namespace`` (every option ``build`` reads) from ``cfg.MODEL.SOLQ``."""
    s = cfg.MODEL.SOLQ
    return argparse.Namespace(
        meta_arch="solq", dataset_file="coco", device=cfg.MODEL.DEVICE, eval=False, masks=True,
        backbone=s.BACKBONE, dilation=s.DILATION, position_embedding=s.POSITION_EMBEDDING,
        num_feature_levels=s.NUM_FEATURE_LEVELS, checkpoint=s.CHECKPOINT, dcn=s.DCN,
        lr_backbone=cfg.SOLVER.BASE_LR * s.LR_BACKBONE_MULT,
        enc_layers=s.ENC_LAYERS, dec_layers=s.DEC_LAYERS, dim_feedforward=s.DIM_FEEDFORWARD, hidden_dim=s.HIDDEN_DIM,
        dropout=s.DROPOUT, nheads=s.NHEADS, num_queries=s.NUM_QUERIES, dec_n_points=s.DEC_N_POINTS,
        enc_n_points=s.ENC_N_POINTS, activation=s.ACTIVATION, with_box_refine=s.WITH_BOX_REFINE,
        two_stage=s.TWO_STAGE, with_vector=s.WITH_VECTOR, n_keep=s.N_KEEP, gt_mask_len=s.GT_MASK_LEN,
        vector_hidden_dim=s.VECTOR_HIDDEN_DIM, vector_loss_coef=s.VECTOR_LOSS_COEF,
        no_vector_loss_norm=s.NO_VECTOR_LOSS_NORM, vector_start_stage=s.VECTOR_START_STAGE, aux_loss=s.AUX_LOSS,
        set_cost_class=s.SET_COST_CLASS, set_cost_bbox=s.SET_COST_BBOX, set_cost_giou=s.SET_COST_GIOU,
        cls_loss_coef=s.CLS_LOSS_COEF, bbox_loss_coef=s.BBOX_LOSS_COEF, giou_loss_coef=s.GIOU_LOSS_COEF,
        focal_alpha=s.FOCAL_ALPHA,
    )


def build_stock_solq(cfg):
    """SOLQ's own (model, criterion), exactly as its ``main.py`` builds them for ``cfg``, with
    ``MODEL.SOLQ.NUM_CLASSES`` classes (SOLQ's ``build`` fixes 91: other counts get fresh class
    heads, initialised as SOLQ initialises its own)."""
    s = cfg.MODEL.SOLQ
    if s.CLASS_IDS not in CLASS_IDS:
        raise ValueError(f"MODEL.SOLQ.CLASS_IDS = {s.CLASS_IDS!r}: must be one of {list(CLASS_IDS)}")
    if not s.WITH_VECTOR:
        raise ValueError("MODEL.SOLQ.WITH_VECTOR = False: SOLQ then predicts no masks (its mask branch is the vectors)")
    model, criterion, _ = build_solq(solq_args(cfg))
    if s.NUM_CLASSES != 91:
        bias = -math.log((1 - 0.01) / 0.01)  # SOLQ's prior_prob 0.01
        for i, head in enumerate(model.class_embed):
            fresh = nn.Linear(head.in_features, s.NUM_CLASSES)
            nn.init.constant_(fresh.bias, bias)
            model.class_embed[i] = fresh  # with_box_refine: clones; without, the same head each time
        criterion.num_classes = s.NUM_CLASSES
    return model, criterion


@META_ARCH_REGISTRY.register()
class SOLQ(nn.Module):
    """SOLQ's model and criterion behind detectron2's meta-architecture interface. ``self.solq``
    is SOLQ's model object (not a submodule: its modules are this module's children);
    ``self.criterion`` its ``SetCriterion`` (no parameters)."""

    def __init__(self, cfg):
        super().__init__()
        model, criterion = build_stock_solq(cfg)
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["solq"] = model
        self.__dict__["criterion"] = criterion
        self.__dict__["postprocess"] = PostProcess(processor_dct=model.processor_dct)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), persistent=False)
        self.size_divisibility = cfg.MODEL.SOLQ.SIZE_DIVISIBILITY
        self.num_classes = cfg.MODEL.SOLQ.NUM_CLASSES
        # contiguous class -> the label SOLQ predicts (COCO's category id for CLASS_IDS "dataset")
        self.register_buffer("labels_of", self._label_table(cfg), persistent=False)
        self.to(torch.device(cfg.MODEL.DEVICE))

    def _label_table(self, cfg):
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
        if cfg.MODEL.SOLQ.CLASS_IDS == "contiguous" or not names:
            return torch.arange(self.num_classes)
        meta = MetadataCatalog.get(names[0])
        mapping = meta.get("thing_dataset_id_to_contiguous_id")
        if not mapping:
            raise ValueError(
                f"MODEL.SOLQ.CLASS_IDS = 'dataset' (SOLQ's COCO category ids) needs the dataset's "
                f"thing_dataset_id_to_contiguous_id ({names[0]!r} has none): set MODEL.SOLQ.CLASS_IDS contiguous "
                "and MODEL.SOLQ.NUM_CLASSES to its number of classes")
        table = torch.full((len(mapping),), -1, dtype=torch.long)
        for dataset_id, contiguous in mapping.items():
            table[contiguous] = dataset_id
        if int(table.max()) >= self.num_classes:
            raise ValueError(f"MODEL.SOLQ.NUM_CLASSES = {self.num_classes}, but {names[0]!r} has category id "
                             f"{int(table.max())} (MODEL.SOLQ.CLASS_IDS 'dataset')")
        return table

    @property
    def device(self):
        return self.pixel_mean.device

    def nested_images(self, batched_inputs, size_divisibility):
        """SOLQ's input: the normalised images padded with 0 (``NestedTensor``; mask True on padding)."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, size_divisibility)
        mask = torch.ones(images.tensor.shape[0], *images.tensor.shape[-2:], dtype=torch.bool, device=self.device)
        for m, (h, w) in zip(mask, images.image_sizes):
            m[:h, :w] = False
        return NestedTensor(images.tensor, mask), images.image_sizes

    def prepare_targets(self, batched_inputs, image_sizes):
        """SOLQ's targets (its ``datasets.coco`` + ``transforms.Normalize``): ``labels`` (its class
        ids), ``boxes`` (cx, cy, w, h normalised by the image size), ``xyxy_boxes`` (absolute),
        ``masks`` [N, h, w] at the image's size, ``size``."""
        targets = []
        for x, (h, w) in zip(batched_inputs, image_sizes):
            inst = x["instances"].to(self.device)
            xyxy = inst.gt_boxes.tensor.float()
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            masks = instance_bitmasks(inst, (h, w)).to(self.device) if len(inst) else \
                torch.zeros(0, h, w, dtype=torch.bool, device=self.device)
            targets.append({
                "labels": self.labels_of[inst.gt_classes], "boxes": box_xyxy_to_cxcywh(xyxy) / scale,
                "xyxy_boxes": xyxy, "masks": masks, "size": torch.tensor([h, w], device=self.device),
            })
        return targets

    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        samples, sizes = self.nested_images(batched_inputs, self.size_divisibility)
        targets = self.prepare_targets(batched_inputs, sizes)
        outputs = self.solq(samples)
        losses = self.criterion(outputs, targets)
        weights = self.criterion.weight_dict
        return {k: v * weights[k] for k, v in losses.items() if k in weights}

    @torch.no_grad()
    def inference(self, batched_inputs):
        samples, sizes = self.nested_images(batched_inputs, 0)  # SOLQ pads to the largest image only
        outputs = self.solq(samples)
        out_sizes = torch.tensor([[x.get("height", h), x.get("width", w)] for x, (h, w) in zip(batched_inputs, sizes)],
                                 device=self.device)
        contiguous = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.device)
        contiguous[self.labels_of] = torch.arange(len(self.labels_of), device=self.device)
        results = []
        for r, (h, w) in zip(self.postprocess(outputs, out_sizes), out_sizes.tolist()):
            classes = contiguous[r["labels"]]
            keep = classes >= 0  # CLASS_IDS "dataset": ids COCO does not use (SOLQ's 91 include 11)
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(r["boxes"][keep])
            inst.scores = r["scores"][keep]
            inst.pred_classes = classes[keep]
            inst.pred_masks = r["masks"][:, 0][keep.cpu()].bool()
            results.append({"instances": inst})
        return results


class SOLQDatasetMapper:
    """SOLQ's training augmentation (``datasets/coco.py``, ``make_coco_transforms('train')``) with
    detectron2's transforms, as DETR's d2 wrapper maps DETR's: a horizontal flip, then with
    probability 1/2 a resize of the short side to one of ``INPUT.MIN_SIZE_TRAIN`` (long side <=
    ``INPUT.MAX_SIZE_TRAIN``), else a resize to one of ``MODEL.SOLQ.CROP_RESIZE``, a random crop
    (``INPUT.CROP``: SOLQ's RandomSizeCrop(384, 600) is "absolute_range" (384, 600)) and that
    resize. Crowd annotations are dropped, as SOLQ's ``ConvertCocoPolysToMask`` drops them."""

    def __init__(self, cfg, is_train=True):
        self.is_train = is_train
        self.flip = T.RandomFlip()
        self.resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, "choice")
        self.crop = None
        if cfg.INPUT.CROP.ENABLED:
            self.crop = [T.ResizeShortestEdge(tuple(cfg.MODEL.SOLQ.CROP_RESIZE), sample_style="choice"),
                         T.RandomCrop(cfg.INPUT.CROP.TYPE, tuple(cfg.INPUT.CROP.SIZE))]
        self.image_format = cfg.INPUT.FORMAT
        self.mask_format = cfg.INPUT.MASK_FORMAT

    def __call__(self, dataset_dict):
        d = copy.deepcopy(dataset_dict)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        augs = [self.flip, self.resize]
        if self.crop is not None and np.random.rand() < 0.5:
            augs = [self.flip, *self.crop, self.resize]
        image, transforms = T.apply_transform_gens(augs, image)
        shape = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annos = [utils.transform_instance_annotations(a, transforms, shape)
                 for a in d.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        d["instances"] = utils.filter_empty_instances(
            utils.annotations_to_instances(annos, shape, mask_format=self.mask_format))
        return d
