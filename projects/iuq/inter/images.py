"""The image-level memory and inter-scene loss of adapters whose decode is a *replay*
(``IUQAdapter.memory_kind == "images"``; SOLQ).

A pixel-embedding model decodes a query on any set of pixels, so its memory holds pixel samples
(``PixelMemory``). A model whose queries read an image only through attention into dense maps
(SOLQ: the last decoder layer's deformable cross-attention into the encoder memory) decodes a
query on another image by replaying that attention against the other image's maps, which needs
the image's maps whole: this memory holds whole :class:`Scene` s of past images (detached),
keyed by image id, FIFO, ``MEMORY.SIZE`` images. In a torch.distributed job every rank enqueues
the all-gathered scenes of all ranks, in rank order (as ``PixelMemory`` does), so all replicas
hold the same memory; it is saved in training checkpoints (``state_dict``), never in the model.
"""
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .losses import inter_pointwise_loss


@dataclass
class Scene:
    """What a replay reads of one image: per level, its maps on the image's valid cells
    (``levels`` [C, h_l, w_l]), which of those cells are padding (``pads`` [h_l, w_l] bool: none for
    an image as the model saw it; a flip's canvas adds some) and the level's stride."""

    levels: list
    pads: list
    strides: tuple

    def detach(self, dtype=None, device=None):
        def move(t):
            return t.detach().to(device=device or t.device, dtype=dtype or t.dtype)

        return Scene([move(f) for f in self.levels], [p.detach().to(device or p.device) for p in self.pads],
                     tuple(self.strides))

    def numel(self):
        return sum(f.numel() for f in self.levels)


class BatchScenes(list):
    """This batch's (image id, :class:`Scene`) pairs, as the trainer hands them to the memory
    (``.detach()``, like ``PixelSamples``)."""

    def detach(self):
        return BatchScenes((i, s.detach()) for i, s in self)


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_objects(obj):
    """Every rank's ``obj``, in rank order (pickled: the scenes' shapes differ from rank to rank)."""
    out = [None] * _world_size()
    dist.all_gather_object(out, obj)
    return out


class ImageMemory:
    """A FIFO queue of at most ``capacity`` (image id, :class:`Scene`) pairs, stored in ``dtype``;
    ``capacity == 0`` keeps nothing (mini-batch only)."""

    def __init__(self, capacity, dtype=torch.float32, device="cpu"):
        if capacity < 0:
            raise ValueError(f"ImageMemory capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.dtype = dtype
        self.device = torch.device(device)
        self.entries = deque()

    def __len__(self):
        return len(self.entries)

    def scenes(self):
        """The stored (image id, Scene) pairs, oldest first."""
        return list(self.entries)

    def nbytes(self):
        return sum(f.numel() * f.element_size() for _, s in self.entries for f in s.levels)

    def enqueue(self, scenes, gather=True):
        if self.capacity == 0:
            return
        scenes = list(scenes)
        if gather and _world_size() > 1:
            cpu = [(i, s.detach(device=torch.device("cpu"))) for i, s in scenes]
            scenes = [entry for part in _all_gather_objects(cpu) for entry in part]
        for image_id, scene in scenes:
            self.entries.append((int(image_id), scene.detach(dtype=self.dtype, device=self.device)))
        while len(self.entries) > self.capacity:
            self.entries.popleft()

    def state_dict(self):
        return {
            "capacity": self.capacity,
            "image_ids": [i for i, _ in self.entries],
            "levels": [[f.cpu() for f in s.levels] for _, s in self.entries],
            "pads": [[p.cpu() for p in s.pads] for _, s in self.entries],
            "strides": [tuple(s.strides) for _, s in self.entries],
        }

    def load_state_dict(self, state):
        """Restore a saved memory (its newest ``capacity`` scenes, oldest first)."""
        missing = {"capacity", "image_ids", "levels", "pads", "strides"} - set(state)
        if missing:
            raise KeyError(f"ImageMemory state_dict lacks {sorted(missing)} (a PixelMemory's state? "
                           "MODEL.IUQ.MEMORY.SAMPLING differs from the checkpoint's)")
        self.entries.clear()
        saved = zip(state["image_ids"], state["levels"], state["pads"], state["strides"])
        self.enqueue([(i, Scene(list(levels), list(pads), tuple(strides))) for i, levels, pads, strides in saved],
                     gather=False)


def image_inter_loss(replay_logits, queries, query_meta, query_image_ids, scenes, loss="focal", alpha=0.1, gamma=2.5):
    """Eq. 5's inter-scene term on whole images: each query replayed (``replay_logits(queries,
    query_meta, scene) -> [q, K]`` class logits) on every scene of ``scenes`` ((image id, Scene)
    pairs: the batch's other images, then the memory's) but its own image's, against an all-zero
    target (``inter_pointwise_loss``: focal with ``alpha`` on the target-1 side, fvcore's
    convention), summed over the K classes (as the base model's class loss sums them) and
    averaged over the (query, other image) pairs. Each scene is replayed once, for all the
    queries not from it. Returns a scalar (0 without pairs, on the queries' graph)."""
    total, pairs = queries.sum() * 0.0, 0
    for image_id, scene in scenes:
        keep = query_image_ids != image_id
        n = int(keep.sum())
        if n == 0:
            continue
        logits = replay_logits(queries[keep], {k: v[keep] for k, v in query_meta.items()}, scene)
        total = total + inter_pointwise_loss(logits, loss, alpha, gamma).sum()
        pairs += n
    return total / max(pairs, 1)
