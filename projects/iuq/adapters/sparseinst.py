"""SparseInst (github.com/hustvl/SparseInst): the queries are the mask kernels its instance branch
reads off the instance activation maps, for the kernels its matcher assigns to ground truth in
that step; the pixel embeddings its mask branch's output (``KERNEL_DIM`` channels, stride 8); a
kernel decodes a mask by a dot product, then SparseInst's x2 bilinear upsampling to the stride-4
grid its mask loss uses.

Wrapped calls (on the instances, never the classes): ``decoder.inst_branch.forward`` (the kernels
[B, N, D]), ``decoder.mask_branch.forward`` (the embeddings [B, D, H/8, W/8]) and
``criterion.matcher.forward`` (the step's one-to-one assignment, reused as it is: the matcher is
never run again). The matcher's result on a batch without any instance is a pair of float tensors,
which its loss cannot index with; the wrap hands the loss int64 ones, so such a batch trains.

Equivariance: the decoder concatenates two coordinate channels, normalised to [-1, 1] over the
*padded* feature map, to the features of both branches. The embeddings therefore see absolute
position relative to the padded batch, not to the image: a flip or crop moves an instance's
coordinates by an amount that depends on the padding, and L_equi asks the kernels to undo it (the
paper's models, CondInst included, have the same kind of input in their relative coordinates).
"""
import torch.nn.functional as F
from sparseinst.loss import dice_loss
from sparseinst.utils import nested_masks_from_list

from ..inter.losses import dot_product_decode, dot_product_map
from ..engine.solver import build_grouped_optimizer
from .base import IUQ_ADAPTER_REGISTRY, IUQAdapter, record_matched


@IUQ_ADAPTER_REGISTRY.register()
class SparseInst(IUQAdapter):
    """Registered under the meta-architecture's name."""

    def _install(self, cfg):
        model, decoder = self.model, self.model.decoder
        self.stride = 8  # the encoder's output, P3 (SparseInst's decoder runs at stride 8)
        self.scale = decoder.scale_factor  # the masks the loss sees: x2, stride 4
        loss = cfg.MODEL.SPARSE_INST.LOSS
        self.dice_weight, self.pixel_weight = loss.MASK_DICE_WEIGHT, loss.MASK_PIXEL_WEIGHT
        inst_forward, mask_forward, match = decoder.inst_branch.forward, decoder.mask_branch.forward, model.criterion.matcher.forward

        def wrapped_inst_forward(features):
            out = inst_forward(features)
            if self.captured is not None:
                self._kernels = out[1]  # [B, N, D]
            return out

        def wrapped_mask_forward(features):
            out = mask_forward(features)
            if self.captured is not None:
                self.captured.embeddings = out  # [B, D, H/8, W/8]
            return out

        def wrapped_match(outputs, targets, input_shape):
            indices = [(i.long(), j.long()) for i, j in match(outputs, targets, input_shape)]
            if self.captured is not None:
                self._record(indices, targets, input_shape)
            return indices

        decoder.inst_branch.forward = wrapped_inst_forward
        decoder.mask_branch.forward = wrapped_mask_forward
        model.criterion.matcher.forward = wrapped_match

    def _record(self, indices, targets, input_shape):
        """The matched kernels [Q, D] and, per query, its target on the loss grid as SparseInst
        builds it: the instance mask zero-padded to the batch's input shape, then bilinearly
        resized to the stride-4 grid (soft values at the edges, as in its loss)."""
        cap, kernels = self.captured, self._kernels
        masks = [t["masks"].tensor for t in targets]
        record_matched(cap, kernels, indices, [len(m) for m in masks])
        h, w = cap.embeddings.shape[-2:]
        grid = (int(h * self.scale), int(w * self.scale))
        if sum(len(m) for m in masks) == 0:
            cap.gt_masks = kernels.new_zeros(0, *grid)
        else:
            padded, _ = nested_masks_from_list(masks, input_shape).decompose()
            cap.gt_masks = F.interpolate(padded[:, None].to(kernels.dtype), size=grid, mode="bilinear",
                                         align_corners=False)[:, 0]
        cap.stride, cap.mask_stride = self.stride, int(self.stride / self.scale)

    @classmethod
    def train_mapper(cls, cfg):
        """SparseInst's own mapper (MODEL.SPARSE_INST.DATASET_MAPPER), as its train_net uses it."""
        if cfg.MODEL.SPARSE_INST.DATASET_MAPPER != "SparseInstDatasetMapper":
            return None
        from sparseinst import SparseInstDatasetMapper

        if not cfg.MODEL.MASK_ON:
            raise ValueError("MODEL.MASK_ON False: SparseInst's mapper then drops the masks IUQ needs")
        return SparseInstDatasetMapper(cfg, is_train=True)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """SparseInst's optimizer, as its tools/train_net.py builds it: one group per parameter,
        lr x SOLVER.BACKBONE_MULTIPLIER for the backbone, no weight decay on norms (and on a
        transformer's patch embedding and class token); SOLVER.OPTIMIZER "ADAMW" (with
        SOLVER.AMSGRAD) or "SGD"; gradient clipping by detectron2, or of the whole model at once
        with SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"."""
        s = cfg.SOLVER
        groups, seen = [], set()
        for name, p in model.named_parameters():
            if not p.requires_grad or p in seen:
                continue
            seen.add(p)
            no_decay = "norm" in name or "patch_embed" in name or "cls_token" in name
            groups.append({"params": [p], "lr": s.BASE_LR * (s.BACKBONE_MULTIPLIER if "backbone" in name else 1.0),
                           "weight_decay": 0.0 if no_decay else s.WEIGHT_DECAY})
        return build_grouped_optimizer(cfg, groups, "SparseInst")

    decode_samples = dot_product_decode  # a SampleDecode: the inter-scene loss runs it chunk by chunk

    def decode_map(self, queries, query_meta, query_images, embeddings):
        """<q, F> at stride 8, then SparseInst's own x2 bilinear upsampling: [Q, 2 Hf, 2 Wf]. On a
        cropped region the upsampling's last row and column read the region's edge (clamped)
        where the whole map would read the next cell."""
        logits = dot_product_map(queries, query_images, embeddings)
        return F.interpolate(logits[None], scale_factor=self.scale, mode="bilinear", align_corners=False)[0]

    def mask_loss(self, logits, targets):
        """SparseInst's mask loss per query, averaged: its dice (summed over matched queries / their
        number) x MASK_DICE_WEIGHT + its pixel BCE (mean over pixels) x MASK_PIXEL_WEIGHT."""
        logits, targets = logits.flatten(1), targets.flatten(1).to(logits.dtype)
        dice = dice_loss(logits, targets, reduction="none").mean()
        pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="mean")
        return dice * self.dice_weight + pixel * self.pixel_weight

