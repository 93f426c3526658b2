"""The transform group G of the equivariance loss (Eq. 6-8), acting consistently on an image, its
instance masks and boxes, and the stride-s feature map of the image.

Geometry convention: continuous pixel coordinates, an image of valid size (h, w) spans
[0, w) x [0, h); pixel (i, j) is the unit square at (j, i). A feature map of stride s has its cell
(i, j) on the square [s*j, s*(j+1)) x [s*i, s*(i+1)), and an image of valid size (h, w) has
``ceil(h/s) x ceil(w/s)`` valid cells: the last row / column of cells may overhang the image
into the batch padding. Call ``[0, s*ceil(w/s))`` the image's *aligned canvas*.

Exactness: flip and crop are defined on the aligned canvas so that they map feature cells onto
feature cells, and ``g(F)`` is pure indexing, with no interpolation:

- ``HFlip`` mirrors the aligned canvas. When ``w`` is not a multiple of ``s``, the view is the
  image padded on the right to the canvas (with the padding value the batch uses) and then
  mirrored, so its first ``s*ceil(w/s) - w`` columns are padding. Mirroring just the image would
  move every cell by a fraction of a cell, which no resampling of ``F`` can reproduce exactly.
- ``Crop`` takes boxes whose left / top edges lie on the stride lattice and whose right / bottom
  edges lie on it too or on the image's own edge (where the view is padded exactly as the
  original was).

For a translation-equivariant network of stride s (a stack of convolutions), this gives
``f(g(I)) == g(f(I))`` inside the valid region (``tests/test_equivariance.py``).
``Rotate`` and ``Scale`` (the supplementary's extra transforms) move cells off the lattice: they
resample the image, the masks and ``F`` at the exact mapped coordinates (bilinear), which is as
close as a sampled feature map can get.
"""
import math
import random

import torch
import torch.nn.functional as F


def valid_cells(size, stride):
    """Valid cells (ceil(h/s), ceil(w/s)) of an image of valid size (h, w) on a stride-s map."""
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)


class Transform:
    """One geometric map from an input canvas of ``in_size`` = (h, w) to ``out_size``.

    ``apply_image`` [C, h, w] -> [C, h', w'];  ``apply_masks`` [N, h, w] -> [N, h', w'] (bool);
    ``apply_boxes`` [N, 4] xyxy -> [N, 4] (clipped to the output);
    ``apply_features`` [C, ceil(h/s), ceil(w/s)] -> [C, ceil(h'/s), ceil(w'/s)].
    Inputs are the valid regions (no batch padding); callers slice them out.
    """

    in_size = out_size = (0, 0)
    stride = 1

    def _check(self, tensor, size, what):
        if tuple(tensor.shape[-2:]) != tuple(size):
            raise ValueError(
                f"{type(self).__name__} expects {what} of spatial size {tuple(size)}, got "
                f"{tuple(tensor.shape[-2:])}"
            )

    def _check_features(self, features):
        self._check(features, valid_cells(self.in_size, self.stride), "features")


class HFlip(Transform):
    """Horizontal mirror of the aligned canvas (exact on stride-s features)."""

    def __init__(self, in_size, stride):
        self.in_size, self.stride = tuple(in_size), stride
        self.canvas_w = valid_cells(in_size, stride)[1] * stride
        self.out_size = (in_size[0], self.canvas_w)

    def _pad_flip(self, t, value):
        self._check(t, self.in_size, "an image/masks")
        extra = self.canvas_w - self.in_size[1]
        if extra:
            pad = t.new_empty(t.shape[:-1] + (extra,))
            pad[...] = value  # broadcasts a per-channel [C, 1, 1] value
            t = torch.cat([t, pad], dim=-1)
        return t.flip(-1)

    def apply_image(self, image, pad_value=0.0):
        value = torch.as_tensor(pad_value, dtype=image.dtype, device=image.device)
        return self._pad_flip(image, value[:, None, None] if value.dim() == 1 else value)

    def apply_masks(self, masks):
        return self._pad_flip(masks.bool(), False)

    def apply_boxes(self, boxes):
        return torch.stack(
            [self.canvas_w - boxes[:, 2], boxes[:, 1], self.canvas_w - boxes[:, 0], boxes[:, 3]], dim=1
        )

    def apply_features(self, features):
        self._check_features(features)
        return features.flip(-1)


class Crop(Transform):
    """Crop of the box [y0, y1) x [x0, x1), snapped to the stride lattice (exact on features)."""

    def __init__(self, in_size, stride, box):
        y0, x0, y1, x1 = box
        h, w = in_size
        aligned = y0 % stride == 0 and x0 % stride == 0
        aligned &= (y1 % stride == 0 or y1 == h) and (x1 % stride == 0 or x1 == w)
        if not aligned or not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(
                f"Crop box (y0, x0, y1, x1) = {box} must lie in the {h}x{w} image with edges on "
                f"the stride-{stride} lattice (or on the image's edge)"
            )
        self.in_size, self.stride, self.box = tuple(in_size), stride, tuple(box)
        self.out_size = (y1 - y0, x1 - x0)

    def apply_image(self, image, pad_value=0.0):
        self._check(image, self.in_size, "an image")
        y0, x0, y1, x1 = self.box
        return image[..., y0:y1, x0:x1]

    def apply_masks(self, masks):
        return self.apply_image(masks.bool())

    def apply_boxes(self, boxes):
        y0, x0, y1, x1 = self.box
        shifted = boxes - boxes.new_tensor([x0, y0, x0, y0])
        limit = boxes.new_tensor([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
        return torch.minimum(shifted.clamp(min=0), limit)

    def apply_features(self, features):
        self._check_features(features)
        y0, x0, y1, x1 = self.box
        s = self.stride
        return features[..., y0 // s : math.ceil(y1 / s), x0 // s : math.ceil(x1 / s)]


class Affine(Transform):
    """``x' = A x + b`` (continuous pixel coordinates) onto an ``out_size`` canvas, by bilinear
    resampling at the exact mapped coordinates. Base of :class:`Rotate` and :class:`Scale`."""

    def __init__(self, in_size, stride, matrix, out_size):
        self.in_size, self.stride, self.out_size = tuple(in_size), stride, tuple(out_size)
        self.matrix = torch.as_tensor(matrix, dtype=torch.float64).reshape(2, 3)
        full = torch.eye(3, dtype=torch.float64)
        full[:2] = self.matrix
        self.inverse = torch.linalg.inv(full)[:2]

    def _resample(self, t, in_extent, out_grid, unit):
        """Sample ``t`` [..., H, W] (covering ``in_extent`` = (H, W) * unit pixels) at the output
        cells of ``out_grid`` = (H', W') whose cells are ``unit`` pixels wide."""
        lead = t.shape[:-2]
        t4 = t.reshape((-1,) + tuple(t.shape[-2:]))[None].float()
        hh, ww = out_grid
        ys = (torch.arange(hh, dtype=torch.float64) + 0.5) * unit
        xs = (torch.arange(ww, dtype=torch.float64) + 0.5) * unit
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        pts = torch.stack([x, y, torch.ones_like(x)], dim=-1) @ self.inverse.t()  # [H', W', 2]
        x, y = pts[..., 0], pts[..., 1]
        inside = (x >= 0) & (x < in_extent[1]) & (y >= 0) & (y < in_extent[0])
        norm = torch.stack([x / in_extent[1] * 2 - 1, y / in_extent[0] * 2 - 1], dim=-1)
        # "border" keeps the half-pixel rim of the source from fading towards zero (a 2x resize
        # then equals F.interpolate's bilinear); points that fall outside the source are zeros.
        out = F.grid_sample(
            t4, norm[None].to(t4), mode="bilinear", padding_mode="border", align_corners=False
        )
        out = out * inside.to(out)
        return out[0].reshape(lead + (hh, ww))

    def apply_image(self, image, pad_value=0.0):
        self._check(image, self.in_size, "an image")
        value = torch.as_tensor(pad_value, dtype=torch.float32, device=image.device)
        value = value[:, None, None] if value.dim() == 1 else value
        out = self._resample(image.float() - value, self.in_size, self.out_size, 1) + value
        return out.to(image.dtype) if image.is_floating_point() else out.round().to(image.dtype)

    def apply_masks(self, masks):
        self._check(masks, self.in_size, "masks")
        return self._resample(masks.float(), self.in_size, self.out_size, 1) >= 0.5

    def apply_boxes(self, boxes):
        x0, y0, x1, y1 = boxes.double().unbind(1)
        corners = torch.stack(
            [torch.stack([x0, y0], 1), torch.stack([x1, y0], 1), torch.stack([x0, y1], 1), torch.stack([x1, y1], 1)],
            dim=1,
        )  # [N, 4, 2]
        mapped = corners @ self.matrix[:, :2].t() + self.matrix[:, 2]
        h, w = self.out_size
        lo, hi = mapped.min(dim=1).values, mapped.max(dim=1).values
        out = torch.cat([lo, hi], dim=1)
        out = torch.minimum(out.clamp(min=0), out.new_tensor([w, h, w, h]))
        return out.to(boxes.dtype)

    def apply_features(self, features):
        self._check_features(features)
        cells = valid_cells(self.in_size, self.stride)
        extent = (cells[0] * self.stride, cells[1] * self.stride)
        out = self._resample(features, extent, valid_cells(self.out_size, self.stride), self.stride)
        return out.to(features.dtype)


class Rotate(Affine):
    """Rotation by ``degrees`` (counter-clockwise on screen) about the image centre; same size."""

    def __init__(self, in_size, stride, degrees):
        h, w = in_size
        t = math.radians(degrees)
        c, s = math.cos(t), math.sin(t)
        cx, cy = w / 2, h / 2
        # y points down, so a counter-clockwise turn on screen is (x, y) -> (c x + s y, -s x + c y).
        matrix = [[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy]]
        super().__init__(in_size, stride, matrix, in_size)
        self.degrees = degrees


class Scale(Affine):
    """Resize by ``factor`` (output side lengths rounded to whole pixels)."""

    def __init__(self, in_size, stride, factor):
        h, w = in_size
        out = (max(1, round(h * factor)), max(1, round(w * factor)))
        super().__init__(in_size, stride, [[out[1] / w, 0, 0], [0, out[0] / h, 0]], out)
        self.factor = factor


class TransformList(Transform):
    """A composition ``g = t_k o ... o t_1`` (applied first to last)."""

    def __init__(self, transforms, in_size, stride):
        self.transforms = list(transforms)
        self.in_size, self.stride = tuple(in_size), stride
        self.out_size = self.transforms[-1].out_size if self.transforms else tuple(in_size)

    def _fold(self, method, x, **kwargs):
        for t in self.transforms:
            x = getattr(t, method)(x, **kwargs)
        return x

    def apply_image(self, image, pad_value=0.0):
        return self._fold("apply_image", image, pad_value=pad_value)

    def apply_masks(self, masks):
        return self._fold("apply_masks", masks)

    def apply_boxes(self, boxes):
        return self._fold("apply_boxes", boxes)

    def apply_features(self, features):
        return self._fold("apply_features", features)

    @property
    def is_exact(self):
        """True when ``g(F)`` is pure indexing (flip / crop only)."""
        return all(isinstance(t, (HFlip, Crop)) for t in self.transforms)

    def __repr__(self):
        return f"TransformList({[type(t).__name__ for t in self.transforms]}, {self.in_size} -> {self.out_size})"


def sample_crop_box(size, stride, relative_range, rng=random):
    """A random crop whose side lengths are ``r`` times the image's (``r`` uniform in
    ``relative_range``, one ``r`` for both sides), snapped to whole feature cells."""
    cells = valid_cells(size, stride)
    r = rng.uniform(*relative_range)
    box = []
    for extent, n in zip(size, cells):
        keep = min(n, max(1, round(r * n)))
        start = rng.randint(0, n - keep)
        box.append((start * stride, min((start + keep) * stride, extent)))
    (y0, y1), (x0, x1) = box
    return y0, x0, y1, x1


def sample_transform(
    size,
    stride,
    transforms=("flip", "crop"),
    crop_range=(0.6, 1.0),
    rotation_range=(0.0, 60.0),
    scale_range=(0.5, 2.0),
    rng=random,
    flip_p=0.5,
):
    """Draw one ``g`` from G for an image of valid ``size``: each named transform is applied in
    the order flip (with probability ``flip_p``), crop, rotation, scale."""
    out, cur = [], tuple(size)
    for name in ("flip", "crop", "rotation", "scale"):
        if name not in transforms:
            continue
        if name == "flip":
            if rng.random() >= flip_p:
                continue
            t = HFlip(cur, stride)
        elif name == "crop":
            t = Crop(cur, stride, sample_crop_box(cur, stride, crop_range, rng))
        elif name == "rotation":
            t = Rotate(cur, stride, rng.uniform(*rotation_range))
        else:
            t = Scale(cur, stride, rng.uniform(*scale_range))
        out.append(t)
        cur = t.out_size
    unknown = set(transforms) - {"flip", "crop", "rotation", "scale"}
    if unknown:
        raise ValueError(f"Unknown transforms {sorted(unknown)}; known: flip, crop, rotation, scale")
    return TransformList(out, size, stride)
