"""Mask2Former (github.com/facebookresearch/Mask2Former, META_ARCHITECTURE ``MaskFormer``): the
queries are the mask embeddings (``mask_embed`` output, [B, N, D]) of the transformer decoder's
*final* layer, for the queries its Hungarian matcher assigns to ground truth in that step; the pixel
embeddings are the pixel decoder's ``mask_features`` ([B, D, H/4, W/4]); a query decodes a mask by
a dot product (``pred_masks = einsum("bqc,bchw->bqhw")``), so ``loss_inter`` takes the fused path.

Wrapped calls (on the instances, never the classes):

- ``sem_seg_head.predictor.forward(x, mask_features, mask)``: records ``mask_features``;
- ``sem_seg_head.predictor.mask_embed.forward``: called once per prediction head (the learnable
  queries', then each decoder layer's); the last call of a forward is the final layer's;
- ``criterion.matcher.forward(outputs, targets)``: the first call of a forward matches the final
  layer (``criterion.forward`` matches ``outputs_without_aux`` before the auxiliary layers). Its
  assignment is recorded and reused as it is: the matcher samples random points, so running it
  again would give another assignment;
- ``prepare_targets(targets, images)``: Mask2Former reads ``gt_masks`` as a tensor [N, H, W]; the
  views and the images without instances that IUQ's trainer hands it carry ``BitMasks``.

Choices (the paper trains Mask2Former in MMDetection and says neither):

- **Final layer only.** Algorithm 1 takes the decoder's output queries; the auxiliary layers'
  losses are Mask2Former's deep supervision of intermediate predictions. IUQ's gradients reach
  every decoder layer through the final queries anyway, and applying both losses to all ten
  prediction heads would multiply their cost (the inter-scene decode, the equivariance decode)
  by ten for intermediate predictions nobody uses at test time.
- **L_equi dense on the view's valid region**, not point-sampled. Mask2Former's loss reads the
  stride-4 logits and the full-resolution target at 12544 points (3/4 of them where the logits are
  most uncertain) to save memory over all 100 queries x 10 layers. L_equi decodes the matched
  queries of the views only, in chunks that are differentiated at once, so a dense map costs little;
  dense is deterministic (no second random draw next to the matcher's) and confined exactly to
  the view's valid cells, where point sampling over the padded map would also read padding. The
  targets are what its point sampler reads at the cell centres: the padded full-resolution masks
  resized bilinearly (``align_corners=False``) to the stride-4 grid. The loss per query is its own:
  MASK_WEIGHT x sigmoid cross-entropy (mean over cells) + DICE_WEIGHT x its dice (+1 smoothed).

Equivariance: the pixel decoder's deformable attention adds sine position encodings of the padded
map, and the transformer decoder attends over the padding ("we do not apply masking on padded
region"): like CondInst's relative coordinates, absolute position enters the embeddings, and
L_equi asks the model to be equivariant despite it.
"""
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from mask2former.modeling.criterion import dice_loss, sigmoid_ce_loss

from ..inter.losses import dot_product_decode, dot_product_map
from ..engine.solver import build_grouped_optimizer
from ..data.batch import instance_bitmasks
from .base import IUQ_ADAPTER_REGISTRY, IUQAdapter, record_matched

# INPUT.DATASET_MAPPER_NAME -> Mask2Former's mapper class (as its train_net.py chooses them); the
# semantic mapper gives no instances, which IUQ needs.
INSTANCE_MAPPERS = {
    "coco_instance_lsj": "COCOInstanceNewBaselineDatasetMapper",
    "mask_former_instance": "MaskFormerInstanceDatasetMapper",
    "coco_panoptic_lsj": "COCOPanopticNewBaselineDatasetMapper",
    "mask_former_panoptic": "MaskFormerPanopticDatasetMapper",
}

NORM_MODULES = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm, torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


@IUQ_ADAPTER_REGISTRY.register()
class MaskFormer(IUQAdapter):
    """Registered under the meta-architecture's name (Mask2Former's is ``MaskFormer``)."""

    def _install(self, cfg):
        model, predictor = self.model, self.model.sem_seg_head.predictor
        self.stride = cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE  # mask_features: stride 4
        self.mask_weight, self.dice_weight = cfg.MODEL.MASK_FORMER.MASK_WEIGHT, cfg.MODEL.MASK_FORMER.DICE_WEIGHT
        predictor_forward, embed_forward = predictor.forward, predictor.mask_embed.forward
        match, prepare_targets = model.criterion.matcher.forward, model.prepare_targets

        def wrapped_predictor_forward(x, mask_features, mask=None):
            if self.captured is not None:
                self.captured.embeddings = mask_features  # [B, D, H/4, W/4]
                self._matched = False
            return predictor_forward(x, mask_features, mask)

        def wrapped_embed_forward(x):
            out = embed_forward(x)
            if self.captured is not None:
                self._mask_embed = out  # [B, N, D]; the final layer's is the last one
            return out

        def wrapped_match(outputs, targets):
            indices = match(outputs, targets)
            if self.captured is not None and not self._matched:  # the first match: the final layer
                self._matched = True
                self._record(indices, targets)
            return indices

        def wrapped_prepare_targets(targets, images):
            return prepare_targets([_tensor_masks(t) for t in targets], images)

        predictor.forward = wrapped_predictor_forward
        predictor.mask_embed.forward = wrapped_embed_forward
        model.criterion.matcher.forward = wrapped_match
        model.prepare_targets = wrapped_prepare_targets

    def _record(self, indices, targets):
        """The matched queries [Q, D] and, per query, its target on the stride-4 grid: the padded
        mask as Mask2Former's loss holds it, resized bilinearly (its point sampler's values)."""
        cap, embeds = self.captured, self._mask_embed
        masks = [t["masks"] for t in targets]
        record_matched(cap, embeds, indices, [len(m) for m in masks])
        grid = tuple(cap.embeddings.shape[-2:])
        if sum(len(m) for m in masks) == 0:
            cap.gt_masks = embeds.new_zeros(0, *grid)
        else:
            padded = torch.cat([m.to(embeds.dtype) for m in masks])  # [N, H, W], padded to the batch
            cap.gt_masks = F.interpolate(padded[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
        cap.query_classes = torch.cat([t["labels"][tgt.to(t["labels"].device)].to(embeds.device)
                                       for t, (_, tgt) in zip(targets, indices)])  # panoptic: stuff or thing
        cap.stride = cap.mask_stride = self.stride

    @classmethod
    def train_mapper(cls, cfg):
        """Mask2Former's mapper for ``INPUT.DATASET_MAPPER_NAME``, as its train_net.py chooses it
        (LSJ crops for COCO instance segmentation); None (detectron2's) for any other name."""
        name = cfg.INPUT.DATASET_MAPPER_NAME
        if name == "mask_former_semantic":
            raise ValueError(
                "INPUT.DATASET_MAPPER_NAME 'mask_former_semantic' gives no instances, which IUQ's losses need: "
                f"use one of {sorted(INSTANCE_MAPPERS)}"
            )
        if name not in INSTANCE_MAPPERS:
            return None
        import mask2former

        return ImagesWithoutInstances(getattr(mask2former, INSTANCE_MAPPERS[name])(cfg, True))

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Mask2Former's optimizer, as its train_net.py builds it: one group per parameter, lr x
        SOLVER.BACKBONE_MULTIPLIER in the backbone, weight decay SOLVER.WEIGHT_DECAY_NORM on
        normalisation layers, SOLVER.WEIGHT_DECAY_EMBED on embeddings, none on a Swin's relative
        position bias tables and absolute position embedding; SOLVER.OPTIMIZER "ADAMW" or "SGD";
        the gradient norm of the whole model clipped (SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model")."""
        s = cfg.SOLVER
        groups, seen = [], set()
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad or p in seen:
                    continue
                seen.add(p)
                group = {"params": [p], "lr": s.BASE_LR, "weight_decay": s.WEIGHT_DECAY}
                if "backbone" in module_name:
                    group["lr"] = s.BASE_LR * s.BACKBONE_MULTIPLIER
                if "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                    group["weight_decay"] = 0.0
                if isinstance(module, NORM_MODULES):
                    group["weight_decay"] = s.WEIGHT_DECAY_NORM
                if isinstance(module, torch.nn.Embedding):
                    group["weight_decay"] = s.WEIGHT_DECAY_EMBED
                groups.append(group)
        return build_grouped_optimizer(cfg, groups, "Mask2Former")

    decode_samples = dot_product_decode  # a SampleDecode: the inter-scene loss runs it chunk by chunk

    def decode_map(self, queries, query_meta, query_images, embeddings):
        """<q, F> on the stride-4 map of each query's image: [Q, H/4, W/4] (Mask2Former's pred_masks)."""
        return dot_product_map(queries, query_images, embeddings)

    def mask_loss(self, logits, targets):
        """Mask2Former's mask loss, dense, averaged over the queries: MASK_WEIGHT x sigmoid
        cross-entropy (mean over cells) + DICE_WEIGHT x dice (+1 smoothed), its own functions."""
        logits, targets = logits.flatten(1), targets.flatten(1).to(logits.dtype)
        n = max(len(logits), 1)
        return self.mask_weight * sigmoid_ce_loss(logits, targets, n) + self.dice_weight * dice_loss(logits, targets, n)


class ImagesWithoutInstances:
    """Mask2Former's mapper, also for instance-segmentation images without an instance annotation (kept by
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS False``), on which its own ``__call__`` fails (it reads
    ``gt_masks``, which detectron2 adds only for a non-empty list). Such an image goes through the
    mapper without its annotation list (so it is read and transformed as any other) and gets no
    instances: empty boxes, classes and a [0, H, W] mask tensor, as the mapper gives an image whose
    instances were all cropped away."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        if "segments_info" in dataset_dict or any(not a.get("iscrowd", 0) for a in dataset_dict.get("annotations", ())):
            return self.mapper(dataset_dict)  # panoptic (its segments), or an image with instances
        out = self.mapper({k: v for k, v in dataset_dict.items() if k != "annotations"})
        h, w = out["image"].shape[-2:]
        out["instances"] = Instances(
            (h, w), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.int64),
            gt_masks=torch.zeros(0, h, w, dtype=torch.uint8),
        )
        return out

    def __repr__(self):
        return f"ImagesWithoutInstances({self.mapper!r})"


def _tensor_masks(instances):
    """``instances`` with ``gt_masks`` as the tensor [N, H, W] Mask2Former reads: views and images
    without instances come with BitMasks, and the measures' held-out images (detectron2's mapper)
    with polygons."""
    if instances.has("gt_masks") and isinstance(instances.gt_masks, (BitMasks, PolygonMasks)):
        masks = instance_bitmasks(instances, instances.image_size)
        instances = type(instances)(instances.image_size, **instances.get_fields())
        instances.gt_masks = masks
    return instances
