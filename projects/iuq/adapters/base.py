"""The adapter protocol: what IUQ needs from a base model, and nothing of how the model works.

An adapter wraps one or two well-defined calls of the model *instance* (never its class, so the
model's code, state_dict and inference stay untouched) and, while :meth:`IUQAdapter.capture` is
open, records what that training forward computed into a :class:`Captured`. It also knows how the
model turns a query and pixel embeddings into mask logits (``decode_*``) and the model's own mask
loss, so IUQ's losses reuse the model's heads instead of copies of them.
"""
import importlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from fvcore.common.registry import Registry

IUQ_ADAPTER_REGISTRY = Registry("IUQ_ADAPTER")
IUQ_ADAPTER_REGISTRY.__doc__ = "IUQ adapters. A class is registered under its own name, which must be the base model's META_ARCHITECTURE."

# Adapters shipped with IUQ, imported on demand (each needs its base model's package).
BUILTIN_ADAPTERS = {
    "CondInst": ("iuq.adapters.condinst", "AdelaiDet (package `adet`)"),
    "SOLOv2": ("iuq.adapters.solov2", "AdelaiDet (package `adet`)"),
    "SOTR": (
        "iuq.adapters.sotr",
        "SOTR (github.com/easton-cau/SOTR; its package is also named `adet`, so it needs its own environment)",
    ),
    "MaskFormer": (
        "iuq.adapters.mask2former",
        "Mask2Former (github.com/facebookresearch/Mask2Former, package `mask2former`)",
    ),
    "SparseInst": ("iuq.adapters.sparseinst", "SparseInst (github.com/hustvl/SparseInst, package `sparseinst`)"),
    "SOLQ": ("iuq.adapters.solq", "SOLQ (github.com/megvii-research/SOLQ, installed as the package `solq`)"),
}


@dataclass
class Captured:
    """One training forward as IUQ sees it (B = images in the batch, originals then views).

    queries:      [Q, P] queries of the forward (CondInst: dynamic-head parameters of the
                  proposals the mask loss trains; SOLOv2: kernels at positive grid cells).
    query_images: [Q] int64 batch index of each query's image.
    query_meta:   dict of [Q, ...] tensors the decode needs (CondInst: locations, FPN levels).
    gt_masks:     [N, Hm, Wm] ground-truth masks on the mask-loss grid of the padded batch, as the
                  model holds them (any dtype), and
    gt_index:     [Q] int64 the row of ``gt_masks`` each query is matched to (the base model's own
                  assignment). Kept apart so that no [Q, Hm, Wm] copy is made for queries whose
                  target IUQ never reads (only the views' queries need one).
    query_classes: optional [Q] int64 contiguous class of each query's ground truth (adapters that
                  train panoptic models set it: a stuff query's inter-scene targets depend on it).
    query_quality: optional [Q] float, how well each query sits on its instance by the base model's
                  own assignment (CondInst: the FCOS centerness target); ``one_query_per_instance``
                  keeps the highest of an instance's queries (``MODEL.IUQ.INTER.QUERIES``).
    embeddings:   [B, D, Hf, Wf] pixel-embedding map of the padded batch.
    stride:       input pixels per embedding cell; ``mask_stride`` likewise for the masks.
    scene:        adapters with ``memory_kind = "images"`` only: per batch image, what a replay
                  reads of it (``iuq.inter.images.Scene``; SOLQ: its encoder memory levels).
    """

    queries: torch.Tensor = None
    query_images: torch.Tensor = None
    query_meta: dict = field(default_factory=dict)
    gt_masks: torch.Tensor = None
    gt_index: torch.Tensor = None
    query_classes: torch.Tensor = None
    query_quality: torch.Tensor = None
    embeddings: torch.Tensor = None
    stride: int = None
    mask_stride: int = None
    scene: list = None

    def select_queries(self, keep):
        """(queries, query_images, query_meta, targets [q, Hm, Wm] in the queries' dtype) of the
        queries where ``keep`` is True."""
        meta = {k: v[keep] for k, v in self.query_meta.items()}
        targets = self.gt_masks[self.gt_index[keep]].to(self.queries.dtype)
        return self.queries[keep], self.query_images[keep], meta, targets


def one_query_per_instance(instances, keep, quality=None):
    """Indices [K] (ascending) of one query per instance among the queries where ``keep`` [Q] is
    True: ``instances`` [Q] int64 names each query's ground-truth instance (equal = the same
    instance); of an instance's queries the one with the highest ``quality`` [Q] is kept, ties and
    ``quality=None`` going to the first in capture order. ``MODEL.IUQ.INTER.QUERIES =
    matched_originals`` (``keep``: the original images' queries)."""
    idx = keep.nonzero(as_tuple=True)[0]
    if len(idx) == 0:
        return idx
    order = torch.arange(len(idx), device=idx.device)
    if quality is not None:
        order = torch.argsort(-quality[idx].float(), stable=True)
    groups = instances[idx]
    order = order[torch.argsort(groups[order], stable=True)]
    first = torch.ones(len(order), dtype=torch.bool, device=idx.device)
    first[1:] = groups[order][1:] != groups[order][:-1]
    return idx[order[first]].sort().values


def record_matched(cap, slots, indices, counts):
    """Fill ``cap.queries`` / ``query_images`` / ``gt_index`` (and an empty ``query_meta``) from a
    set-prediction model's one-to-one assignment: ``slots`` [B, N, D] its per-slot queries,
    ``indices`` its matcher's result (per image, (slot indices, target indices)), ``counts`` the
    number of targets per image (``gt_index`` indexes their concatenation, image by image)."""
    device = slots.device
    images = torch.cat([torch.full((len(src),), b, dtype=torch.long) for b, (src, _) in enumerate(indices)]).to(device)
    src = torch.cat([src for src, _ in indices]).to(device)
    offsets = torch.tensor([0] + list(counts), device=device).cumsum(0)[:-1]
    cap.queries = slots[images, src]
    cap.query_images = images
    cap.query_meta = {}
    cap.gt_index = torch.cat([tgt.to(device) + offsets[b] for b, (_, tgt) in enumerate(indices)])


class IUQAdapter:
    """Base class. Subclasses implement ``_install`` (wrap the model's calls; record into
    ``self.captured`` while it is not None), ``decode_samples``, ``decode_map``, ``mask_loss``
    and set ``self.stride`` (the embedding map's stride) in ``_install``.

    ``memory_kind``: "pixels" (a query decodes on any pixel samples: the memory holds pixel
    samples, ``PixelMemory``), or "images" for a model whose decode is a *replay* of an attention
    over another image's dense maps (SOLQ): the memory holds whole images (``ImageMemory``) and the
    adapter implements ``batch_scenes``, ``replay_logits`` and ``replay_mask_loss`` instead of the
    three decodes (``iuq/adapters/solq.py``; docs/adapters.md)."""

    memory_kind = "pixels"

    def __init__(self, cfg, model):
        self.model = model.module if hasattr(model, "module") else model  # DDP / DataParallel
        self.captured = None
        self.stride = None
        self._install(cfg)

    def _install(self, cfg):
        raise NotImplementedError

    @contextmanager
    def capture(self):
        """Record what the model's training forward inside this block computes."""
        self.captured = Captured()
        try:
            yield self.captured
        finally:
            self.captured = None

    @classmethod
    def check_config(cls, cfg):
        """Raise ``ValueError`` naming the key of a ``MODEL.IUQ`` setting this model cannot use.
        Pixel memories: ``MEMORY.SAMPLING`` "images" is for adapters whose memory holds images."""
        if cfg.MODEL.IUQ.MEMORY.SAMPLING == "images" and cls.memory_kind != "images":
            raise ValueError(
                f"Invalid config MODEL.IUQ.MEMORY.SAMPLING = 'images': {cls.__name__}'s queries decode on pixel "
                "samples; 'images' (whole encoder memories) is for adapters whose decode is a replay (SOLQ)")

    @classmethod
    def train_mapper(cls, cfg):
        """The dataset mapper the base model trains with (it must keep instance masks), or None
        for detectron2's ``DatasetMapper`` with instance masks."""
        return None

    @classmethod
    def build_optimizer(cls, cfg, model):
        """The optimizer the base model trains with, or None for detectron2's default (SGD)."""
        return None

    def query_instances(self, cap):
        """[Q] int64: which ground-truth instance of the batch each captured query is matched to
        (equal values, the same instance). Default ``cap.gt_index``: batch-global instance rows
        (CondInst's ``gt_inds``, the set-prediction models' matched targets). Adapters whose
        ``gt_masks`` hold one row per query, not per instance, override it."""
        return cap.gt_index

    def decode_samples(self, queries, query_meta, embeddings, locations):
        """Logits [Q, C] of the queries on arbitrary pixel samples: embeddings [C, D], their
        (x, y) locations [C, 2] in their own image's input pixels. Adapters may set it to a
        :class:`~iuq.inter.losses.SampleDecode`, whose query-side work the inter-scene loss then does
        once instead of once per chunk of samples."""
        raise NotImplementedError

    def decode_map(self, queries, query_meta, query_images, embeddings):
        """Logits [Q, Hm, Wm] of each query on its image's slice of an embedding map
        [B, D, Hf, Wf], on the grid the model's mask loss uses. A function of the queries and the
        map alone (no trainable parameters of its own): ``loss_equi`` differentiates it, chunk by
        chunk, with respect to those two only. Logits on a region's cells must not depend on cells
        outside it (``loss_equi`` decodes each view on its valid region)."""
        raise NotImplementedError

    def mask_loss(self, logits, targets):
        """The base model's own mask loss of ``logits`` [Q, Hm, Wm] against ``targets`` [Q, Hm, Wm]
        (every cell counts: callers pass the valid region only), averaged over the queries."""
        raise NotImplementedError


def adapter_class(cfg):
    """The adapter class for ``cfg.MODEL.META_ARCHITECTURE``; a clear error if there is none."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in IUQ_ADAPTER_REGISTRY and name in BUILTIN_ADAPTERS:
        module, package = BUILTIN_ADAPTERS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"The IUQ adapter for MODEL.META_ARCHITECTURE={name!r} needs {package}: {e}") from e
    if name not in IUQ_ADAPTER_REGISTRY:
        known = sorted(set(BUILTIN_ADAPTERS) | {k for k, _ in IUQ_ADAPTER_REGISTRY})
        raise ValueError(
            f"MODEL.IUQ.ENABLED is True but MODEL.META_ARCHITECTURE={name!r} has no IUQ adapter; "
            f"known: {known}. Register one with @IUQ_ADAPTER_REGISTRY.register()."
        )
    return IUQ_ADAPTER_REGISTRY.get(name)


def adapter_class_or_none(cfg):
    """The adapter class for ``cfg.MODEL.META_ARCHITECTURE``, or None where it has none that can
    be imported here."""
    try:
        return adapter_class(cfg)
    except (ImportError, ValueError):
        return None


def build_adapter(cfg, model):
    """The adapter registered under ``cfg.MODEL.META_ARCHITECTURE``, installed on ``model``; the
    one already installed there if any (the trainer's and the measures' share it: wrapping the
    model's calls twice would record every forward twice)."""
    target = model.module if hasattr(model, "module") else model
    existing = target.__dict__.get("_iuq_adapter")
    if existing is not None:
        return existing
    adapter = adapter_class(cfg)(cfg, model)
    target.__dict__["_iuq_adapter"] = adapter  # a plain attribute: not a submodule, not in the state_dict
    return adapter
