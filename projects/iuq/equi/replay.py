"""``L_equi`` (Eq. 8) for adapters whose decode is a replay (``memory_kind == "images"``; SOLQ):
``F`` is a multi-level :class:`~iuq.inter.images.Scene` (SOLQ: the encoder memory, strides 8 /
16 / 32 / 64), ``g`` acts on each level at its own stride on the valid cells, and the view's
matched queries are replayed on ``g(F)`` of the original and scored by the model's own mask loss
against the view's ground truth.

The views are drawn on the coarsest level's lattice (the adapter's ``stride``), so a crop's edges
lie on every level's lattice and ``g`` is exact (pure indexing) on each. A flip mirrors the
coarsest stride's aligned canvas, which on a finer level is wider than the image's valid cells:
the cells it adds there were padding of the original, and they stay padding in ``g(F)``
(``Scene.pads``: a replay gives them no value, as the model gave the original's padding none).
Rotation and scale resample every level at the exact mapped coordinates (cells mapped from
outside the source are padding).
"""
import copy

import torch

from ..inter.images import Scene
from .transforms import Crop, HFlip


def transform_level(g, features, pad, stride):
    """``g`` on one level: ``features`` [C, h, w] and ``pad`` [h, w] (bool) on the valid cells of a
    stride-``stride`` map of ``g.in_size`` -> the same on the view's valid cells."""
    for t in g.transforms:
        if isinstance(t, HFlip):
            if t.canvas_w % stride:
                raise ValueError(f"a flip's canvas ({t.canvas_w} px, stride {t.stride}) is not on the stride-{stride} "
                                 "lattice: the views must be drawn on the coarsest level's lattice")
            extra = t.canvas_w // stride - features.shape[-1]
            if extra > 0:
                features = torch.cat([features, features.new_zeros(features.shape[:-1] + (extra,))], dim=-1)
                pad = torch.cat([pad, pad.new_ones(pad.shape[:-1] + (extra,))], dim=-1)
            features, pad = features.flip(-1), pad.flip(-1)
            continue
        at_level = copy.copy(t)
        at_level.stride = stride
        features = at_level.apply_features(features)
        if isinstance(t, Crop):
            pad = at_level.apply_features(pad)
        else:  # Affine: the valid part, resampled; under half valid is padding
            pad = at_level.apply_features((~pad).float()[None])[0] < 0.5
    return features, pad


def transform_scene(scene, g):
    """``g(F)`` of a :class:`Scene`: ``g`` on every level at its own stride."""
    moved = [transform_level(g, f, p, s) for f, p, s in zip(scene.levels, scene.pads, scene.strides)]
    return Scene([f for f, _ in moved], [p for _, p in moved], tuple(scene.strides))


def replay_equi_loss(adapter, cap, views, num_originals, mode="full"):
    """Eq. 8 on replayed queries. ``cap.scene`` holds each batch image's :class:`Scene` (originals
    then views); mode "full": each view's matched queries replayed on ``g(F)`` of its original
    (``adapter.replay_mask_loss(cap, rows, scene)``, the model's own mask loss, averaged over the
    view's queries), averaged over all the views' queries; mode "feature": the mean squared
    difference between the view's own levels and ``g(F)`` on the view's valid, non-padding cells.
    Unweighted (the caller applies ``EQUI.WEIGHT``)."""
    scenes = cap.scene
    if mode == "feature":
        diffs = []
        for k, v in enumerate(views):
            moved, own = transform_scene(scenes[v.source], v.g), scenes[num_originals + k]
            for f, p, o in zip(moved.levels, moved.pads, own.levels):
                valid = ~p
                diffs.append((o - f).pow(2).mean(0)[valid].mean() if bool(valid.any()) else f.sum() * 0.0)
        return torch.stack(diffs).mean()
    total, count = cap.embeddings.sum() * 0.0, 0
    for k, v in enumerate(views):
        rows = (cap.query_images == num_originals + k).nonzero(as_tuple=True)[0]
        if len(rows) == 0:
            continue
        total = total + adapter.replay_mask_loss(cap, rows, transform_scene(scenes[v.source], v.g)) * len(rows)
        count += len(rows)
    return total / max(count, 1)
