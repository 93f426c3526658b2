"""The SOLO family (AdelaiDet's SOLOv2, SOTR): queries are the dynamic kernels predicted at the
positive grid cells; pixel embeddings are the unified mask feature (E = 256 channels, stride 4); a
query decodes a mask by a 1x1 convolution, i.e. a dot product.

SOLOv2 and SOTR differ only in the head that predicts the kernels (convolutions vs. a twin
transformer); their ground-truth assignment and ``loss`` are textually the same code. So one
adapter wraps that call, and each model's file only names the model and imports its own dice loss
(the two packages are both called ``adet`` and never live in the same environment).

Wrapped call (on the instance): ``model.loss(cate_preds, kernel_preds, ins_pred, targets)``. Its
arguments hold everything: the kernels per level and image, the grid assignment
(``grid_order_list``), the matched masks at stride 4 (``ins_label_list``) and ``ins_pred``.

Images without instances: the models' own code fails on them (``get_ground_truth_single`` reads
``gt_classes[0]``; ``loss`` concatenates an empty list of dice terms when no image of the batch has
a positive cell). The adapter wraps both calls so that such batches train, IUQ on or off (the trainer
installs the adapter in both): see ``_empty_image_targets`` and ``_loss_without_positives``.
"""
import torch

from ..inter.losses import dot_product_decode, dot_product_map
from .base import IUQAdapter


class GridKernelAdapter(IUQAdapter):
    """Shared by the SOLO-family adapters. Subclasses set ``dice_loss`` to their model's own
    ``dice_loss(input [N, ...] in [0, 1], target [N, ...]) -> [N]`` (as a staticmethod) and are
    registered under their meta-architecture's name."""

    dice_loss = None

    def _install(self, cfg):
        model = self.model
        self.stride = model.backbone.output_shape()[model.mask_in_features[0]].stride
        loss, targets_single = model.loss, model.get_ground_truth_single

        def wrapped_loss(cate_preds, kernel_preds, ins_pred, targets):
            if self.captured is not None:
                self._record(kernel_preds, ins_pred, targets)
            if not any(len(order) for per_image in targets[3] for order in per_image):
                return self._loss_without_positives(loss, cate_preds, kernel_preds, ins_pred, targets)
            return loss(cate_preds, kernel_preds, ins_pred, targets)

        def wrapped_targets_single(img_idx, gt_instances, mask_feat_size):
            if len(gt_instances[img_idx]) == 0:
                return self._empty_image_targets(gt_instances[img_idx].gt_classes.device, mask_feat_size)
            return targets_single(img_idx, gt_instances, mask_feat_size=mask_feat_size)

        model.loss = wrapped_loss
        model.get_ground_truth_single = wrapped_targets_single

    def _empty_image_targets(self, device, mask_feat_size):
        """An image without instances' targets, per level as the model builds them for a level
        with no instance in its scale range (its ``num_ins == 0`` branch): no mask [0, Hm, Wm],
        every cell background (``num_classes``) [S, S], no positive cell [S^2], no grid order."""
        model, h, w = self.model, *mask_feat_size
        levels = [
            (torch.zeros(0, h, w, dtype=torch.uint8, device=device),
             torch.full((s, s), model.num_classes, dtype=torch.int64, device=device),
             torch.zeros(s * s, dtype=torch.bool, device=device), [])
            for s in model.num_grids
        ]
        return tuple(list(part) for part in zip(*levels))

    @staticmethod
    def _loss_without_positives(loss, cate_preds, kernel_preds, ins_pred, targets):
        """The model's losses for a batch without a positive cell: its own ``loss`` on the targets
        plus one stand-in positive (cell 0 of the first level of image 0, an all-zero mask) that only
        its dice term sees (``ins_ind_label_list``, hence the number of instances normalising the
        classification loss, and ``cate_label_list`` are unchanged); that dice term is then zeroed,
        keeping its graph. So ``loss_cate`` is exactly the model's all-background loss."""
        ins_labels, cate_labels, ind_labels, orders = targets
        first = ins_labels[0][0]
        ins_labels = [list(levels) for levels in ins_labels]
        orders = [list(levels) for levels in orders]
        ins_labels[0][0] = first.new_zeros(1, *first.shape[-2:])
        orders[0][0] = [0]
        losses = loss(cate_preds, kernel_preds, ins_pred, (ins_labels, cate_labels, ind_labels, orders))
        losses["loss_ins"] = losses["loss_ins"] * 0.0
        return losses

    def _record(self, kernel_preds, ins_pred, targets):
        """kernel_preds: L levels x [B, E, S_l, S_l] (SOTR's are permuted views: reshape, not
        view); ins_pred: [B, E, Hf, Wf]; targets: the model's (ins_label_list, cate_label_list,
        ins_ind_label_list, grid_order_list), per image then per level."""
        cap = self.captured
        ins_label_list, _, _, grid_order_list = targets
        queries, images, masks = [], [], []
        for level, kernels in enumerate(kernel_preds):  # kernels: [B, E, S, S]
            for i, per_image in enumerate(kernels):
                if len(grid_order_list[i][level]) == 0:
                    # Not even an empty selection: it would tie IUQ's losses to this level's kernel
                    # branch, whose backward then runs on all-zero gradients (the model's own loss
                    # leaves such a level out of its graph).
                    continue
                order = torch.as_tensor(grid_order_list[i][level], dtype=torch.long, device=per_image.device)
                queries.append(per_image.reshape(per_image.shape[0], -1)[:, order].t())
                images.append(torch.full((len(order),), i, dtype=torch.long, device=per_image.device))
                masks.append(ins_label_list[i][level])
        if not queries:  # no positive cell in the batch
            e, (h, w) = kernel_preds[0].shape[1], ins_pred.shape[-2:]
            queries, masks = [ins_pred.new_zeros(0, e)], [ins_pred.new_zeros(0, h, w)]
            images = [torch.zeros(0, dtype=torch.long, device=ins_pred.device)]
        cap.queries = torch.cat(queries)
        cap.query_images = torch.cat(images)
        cap.query_meta = {}
        cap.gt_masks = torch.cat(masks)  # SOLOv2 already holds one mask per positive cell
        cap.gt_index = torch.arange(len(cap.gt_masks), device=cap.gt_masks.device)
        cap.embeddings, cap.stride, cap.mask_stride = ins_pred, self.stride, self.stride

    def query_instances(self, cap):
        """The model holds one mask per positive cell (``gt_index`` is ``arange``): an instance is
        an image's distinct target mask (every level's cells of one instance share its mask at the
        mask feature's stride; two instances with the same mask cannot be told apart anyway)."""
        if len(cap.gt_index) == 0:
            return cap.gt_index
        masks = cap.gt_masks[cap.gt_index].flatten(1).to(torch.uint8)
        distinct = torch.unique(masks, dim=0, return_inverse=True)[1]
        return distinct * (int(cap.query_images.max()) + 1) + cap.query_images  # per image

    decode_samples = dot_product_decode  # a SampleDecode: the inter-scene loss runs it chunk by chunk

    def decode_map(self, queries, query_meta, query_images, embeddings):
        return dot_product_map(queries, query_images, embeddings)

    def mask_loss(self, logits, targets):
        return self.dice_loss(logits.sigmoid(), targets).mean()
