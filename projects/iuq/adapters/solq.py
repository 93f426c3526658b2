"""SOLQ (megvii-research/SOLQ; META_ARCHITECTURE ``SOLQ``, ``iuq.modeling.solq``): the adapter
whose decode is a *replay*, not a dot product.

SOLQ's query (the final decoder state, [B, 300, 384]) gives an instance's mask as 256 zig-zag DCT
coefficients (``vector_embed``) of the mask cropped to its box, from the query alone: the IDCT is a
fixed linear map with no image content, so Eq. 5's ``<q, F'>`` has no counterpart. Image content
reaches a query only through the decoder's deformable cross-attention into the encoder memory (4
levels, strides 8 / 16 / 32 / 64). So:

- a query is the last decoder layer's state after its self-attention (``norm2``'s output), with
  its positional query and its reference box (the last layer's input, normalised to its image's
  valid region);
- "apply query n of image A to image B" = **replay SOLQ's last decoder layer** from that state:
  its cross-attention against B's encoder memory (the reference box rescaled to B's valid
  region), ``norm1``, its FFN, and its heads (class, box, mask vector); on A's own memory the
  replay is SOLQ's own last-layer output (``tests/test_integration_solq.py``);
- the inter-scene target is what SOLQ does with a query matched to nothing: its class logits
  against all-zero, by IUQ's focal loss (``MODEL.IUQ.INTER``: alpha 0.1, gamma 2.5), summed over
  the classes; the memory holds whole encoder memories of past images (``memory_kind =
  "images"``: ``iuq.inter.images``, ``MEMORY.SIZE`` images);
- ``L_equi``: ``g`` on each encoder level at its own stride (``iuq.equi.replay``), the view's
  matched queries replayed on ``g(E)`` of the original, SOLQ's own mask loss
  (``SetCriterion.loss_masks``: ``VECTOR_LOSS_COEF`` x L1 of the DCT vectors) against the view's
  ground truth.

Wrapped calls (on the instances): ``transformer.decoder.forward`` (the encoder memory, its shapes
and valid ratios, the positional queries, the references), ``decoder.layers[-1].norm2.forward``
(the last layer's post-self-attention states) and ``criterion.matcher.forward`` (its first call
per forward matches the last layer: the assignment and SOLQ's targets).

Final layer only, as for Mask2Former (docs/adapters.md): the auxiliary layers' outputs are deep
supervision, and IUQ's gradients reach every layer through the final states.
"""
import torch
from solq.util.misc import inverse_sigmoid

from ..config import SAMPLINGS
from ..engine.solver import build_grouped_optimizer
from ..inter.images import Scene
from .base import IUQ_ADAPTER_REGISTRY, IUQAdapter, record_matched

SOLQ_MEMORY_SAMPLING = "images"


@IUQ_ADAPTER_REGISTRY.register()
class SOLQ(IUQAdapter):
    memory_kind = "images"

    @classmethod
    def check_config(cls, cfg):
        """SOLQ's memory holds whole images, not pixel samples: ``MEMORY.SAMPLING`` must be "images"
        (``MEMORY.SIZE`` then counts images), and the views need training batches padded to the
        coarsest level's stride."""
        iuq = cfg.MODEL.IUQ
        if iuq.MEMORY.SAMPLING != SOLQ_MEMORY_SAMPLING:
            raise ValueError(
                f"Invalid config MODEL.IUQ.MEMORY.SAMPLING = {iuq.MEMORY.SAMPLING!r}: SOLQ's queries decode no pixel "
                "embedding (their masks are DCT vectors of the query alone); its memory holds whole encoder memories "
                f"of past images. Set MODEL.IUQ.MEMORY.SAMPLING {SOLQ_MEMORY_SAMPLING!r} (MEMORY.SIZE then counts "
                f"images; the pixel samplings {[s for s in SAMPLINGS if s != SOLQ_MEMORY_SAMPLING]} need a "
                "pixel-embedding model)")
        if iuq.MEASURES.ENABLED:
            raise ValueError(
                "Invalid config MODEL.IUQ.MEASURES.ENABLED = True: the study's measures decode queries on pixel "
                "embeddings, which SOLQ has none of (not built for replay adapters)")
        stride = solq_strides(cfg)[-1]
        if iuq.EQUI.ENABLED and cfg.MODEL.SOLQ.SIZE_DIVISIBILITY % stride:
            raise ValueError(
                f"Invalid config MODEL.SOLQ.SIZE_DIVISIBILITY = {cfg.MODEL.SOLQ.SIZE_DIVISIBILITY}: L_equi transforms "
                f"every encoder level on its valid cells, which are ceil(size / stride) only for batches padded to "
                f"a multiple of the coarsest stride ({stride})")

    def _install(self, cfg):
        model = self.model
        self.check_config(cfg)
        self.strides = solq_strides(cfg)
        self.stride = self.strides[-1]  # the views are drawn on the coarsest level's lattice
        decoder = model.transformer.decoder
        last = decoder.layers[-1]
        decode, norm2, match = decoder.forward, last.norm2.forward, model.criterion.matcher.forward

        def wrapped_decoder(tgt, reference_points, src, src_spatial_shapes, src_level_start_index,
                            src_valid_ratios, query_pos=None, src_padding_mask=None):
            hs, references = decode(tgt, reference_points, src, src_spatial_shapes, src_level_start_index,
                                    src_valid_ratios, query_pos, src_padding_mask)
            if self.captured is not None:
                self._decoder = dict(memory=src, shapes=src_spatial_shapes, padding=src_padding_mask,
                                     query_pos=query_pos, reference=references[-2] if len(references) > 1
                                     else reference_points)
                self._matched = False
            return hs, references

        def wrapped_norm2(x):
            out = norm2(x)
            if self.captured is not None:
                self._states = out  # [B, Q, C]: the last layer's queries after their self-attention
            return out

        def wrapped_match(outputs, targets):
            indices = match(outputs, targets)
            if self.captured is not None and not self._matched:  # the first match: the last layer's
                self._matched = True
                self._record(indices, targets)
            return indices

        decoder.forward = wrapped_decoder
        last.norm2.forward = wrapped_norm2
        model.criterion.matcher.forward = wrapped_match

    def _record(self, indices, targets):
        cap, d, states = self.captured, self._decoder, self._states
        counts = [len(t["labels"]) for t in targets]
        record_matched(cap, states, indices, counts)
        b, src = cap.query_images, torch.cat([s for s, _ in indices]).to(states.device)
        cap.query_meta = {
            "pos": d["query_pos"][b, src],
            "reference": d["reference"][b, src],
            "target": torch.cat([t.to(states.device) for _, t in indices]),  # index in its image's targets
            "slot": src,  # which of SOLQ's NUM_QUERIES slots
        }
        cap.query_classes = None
        cap.embeddings = d["memory"]  # [B, S, C]: the losses' zero stays on the graph through it
        cap.stride = cap.mask_stride = self.stride
        cap.scene = self.scenes(d["memory"], d["shapes"], d["padding"])
        self._targets = targets

    def scenes(self, memory, shapes, padding):
        """Each batch image's :class:`Scene`: its encoder memory per level, cut to the level's
        valid cells (SOLQ's padding masks), [C, h_l, w_l]."""
        out = []
        sizes = [int(h) * int(w) for h, w in shapes.tolist()]
        per_level = list(zip(memory.split(sizes, dim=1), padding.split(sizes, dim=1), shapes.tolist()))
        for i in range(memory.shape[0]):
            levels, pads = [], []
            for values, pad, (h, w) in per_level:
                pad = pad[i].view(h, w)
                vh, vw = int((~pad[:, 0]).sum()), int((~pad[0, :]).sum())
                levels.append(values[i].view(h, w, -1)[:vh, :vw].permute(2, 0, 1))
                pads.append(pad[:vh, :vw])
            out.append(Scene(levels, pads, tuple(self.strides)))
        return out

    def batch_scenes(self, cap, image_ids, num_originals):
        """The originals' (image id, Scene) pairs: the batch's negatives and, detached, the memory's
        next entries."""
        from ..inter.images import BatchScenes

        return BatchScenes((int(i), s) for i, s in zip(image_ids[:num_originals].tolist(), cap.scene[:num_originals]))

    def replay(self, queries, query_meta, scene):
        """SOLQ's last decoder layer from the states ``queries`` [Q, C] (with ``query_meta``'s
        ``pos`` and ``reference``), its cross-attention against ``scene``: (class logits [Q, K],
        boxes [Q, 4] (cx, cy, w, h normalised to the scene's valid region), mask vectors [Q, n_keep])."""
        model = self.model
        decoder = model.transformer.decoder
        layer, head = decoder.layers[-1], len(decoder.layers) - 1
        dtype = queries.dtype
        shapes = torch.tensor([tuple(f.shape[-2:]) for f in scene.levels], dtype=torch.long, device=queries.device)
        start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        src = torch.cat([f.flatten(1).t() for f in scene.levels]).to(dtype)[None]  # [1, S, C]
        pad = torch.cat([p.flatten() for p in scene.pads])[None]
        reference = query_meta["reference"]
        # normalised to the query's own image's valid region = to the scene's (its valid cells only)
        ref_input = reference[None, :, None, :].expand(1, -1, len(scene.levels), -1)
        tgt = queries[None]
        tgt2 = layer.cross_attn(layer.with_pos_embed(tgt, query_meta["pos"][None]), ref_input, src, shapes,
                                start, pad)
        tgt = layer.norm1(tgt + layer.dropout1(tgt2))
        tgt = layer.forward_ffn(tgt)[0]
        logits = model.class_embed[head](tgt)
        box = model.bbox_embed[head](tgt)
        ref = inverse_sigmoid(reference)
        box = (box + ref) if ref.shape[-1] == 4 else torch.cat([box[..., :2] + ref, box[..., 2:]], dim=-1)
        return logits, box.sigmoid(), model.vector_embed[head](tgt)

    def replay_logits(self, queries, query_meta, scene):
        return self.replay(queries, query_meta, scene)[0]

    def replay_mask_loss(self, cap, rows, scene):
        """SOLQ's own mask loss (``SetCriterion.loss_masks``: VECTOR_LOSS_COEF x L1 of the mask
        vectors against the DCT of the ground truth cropped to its box) of the queries ``rows`` (all
        of one image, a view) replayed on ``scene``, against that image's targets."""
        image = int(cap.query_images[rows[0]])
        meta = {k: v[rows] for k, v in cap.query_meta.items()}
        _, boxes, vectors = self.replay(cap.queries[rows], meta, scene)
        outputs = {"pred_vectors": vectors[None], "pred_boxes": boxes[None]}
        indices = [(torch.arange(len(rows)), meta["target"].cpu())]
        return self.model.criterion.loss_masks(outputs, [self._targets[image]], indices, len(rows))["loss_vector"]

    @classmethod
    def train_mapper(cls, cfg):
        from ..modeling.solq import SOLQDatasetMapper

        return SOLQDatasetMapper(cfg, True)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """SOLQ's optimizer (its main.py): AdamW over three groups by parameter name, lr SOLVER.BASE_LR,
        x MODEL.SOLQ.LR_BACKBONE_MULT for names containing one of LR_BACKBONE_NAMES, x
        LR_LINEAR_PROJ_MULT for LR_LINEAR_PROJ_NAMES; weight decay SOLVER.WEIGHT_DECAY on all; the
        whole model's gradient norm clipped (SOLVER.CLIP_GRADIENTS, CLIP_TYPE "full_model")."""
        s, lr, wd = cfg.MODEL.SOLQ, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
        groups = {"base": [], "backbone": [], "linear_proj": []}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if any(k in name for k in s.LR_BACKBONE_NAMES):
                groups["backbone"].append(p)
            elif any(k in name for k in s.LR_LINEAR_PROJ_NAMES):
                groups["linear_proj"].append(p)
            else:
                groups["base"].append(p)
        rates = {"base": lr, "backbone": lr * s.LR_BACKBONE_MULT, "linear_proj": lr * s.LR_LINEAR_PROJ_MULT}
        param_groups = [{"params": ps, "lr": rates[k], "weight_decay": wd} for k, ps in groups.items() if ps]
        return build_grouped_optimizer(cfg, param_groups, "SOLQ")

    def own_mask_probability(self, cap, num_originals):
        """No dead-mask reading: SOLQ's masks are thresholded IDCTs (no mask logits to die)."""
        return None


def solq_strides(cfg):
    """The encoder levels' strides: the ResNet's C3-C5 (8, 16, 32; C5 at 16 with DILATION), then
    one stride-2 convolution per extra level (SOLQ's ``input_proj``)."""
    s = cfg.MODEL.SOLQ
    if s.NUM_FEATURE_LEVELS == 1:
        return (16 if s.DILATION else 32,)
    strides = [8, 16, 16 if s.DILATION else 32]
    while len(strides) < s.NUM_FEATURE_LEVELS:
        strides.append(strides[-1] * 2)
    return tuple(strides[: max(s.NUM_FEATURE_LEVELS, 3)])
