"""Pixel samples: the unit the memory stores and the inter-scene loss contrasts with, and the three
ways of drawing them from a batch that the paper ablates (Table 4c).

All strategies draw foreground pixels only (pixels inside some instance mask): background pixels
are never stored, since a query firing on background is already penalised by its own image's
mask loss, and the memory's capacity is better spent on instances, which are what a query could
wrongly match.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PixelSamples:
    """``embeddings`` [N, D], ``locations`` [N, 2] as (x, y) in input-image pixels (float32),
    ``image_ids`` [N] int64 dataset-level ids; ``classes`` [N] int64, the contiguous class id of
    the segment each pixel was drawn from (-1: not known), and ``stuff`` [N] bool, whether that
    class is stuff (panoptic segmentation: a stuff query's positives in other images are the
    pixels of its own stuff class). Both default to "unknown thing": every sample a negative."""

    embeddings: torch.Tensor
    locations: torch.Tensor
    image_ids: torch.Tensor
    classes: torch.Tensor = None
    stuff: torch.Tensor = None

    def __post_init__(self):
        n = self.embeddings.shape[0]
        if self.classes is None:
            self.classes = torch.full((n,), -1, dtype=torch.int64, device=self.image_ids.device)
        if self.stuff is None:
            self.stuff = torch.zeros(n, dtype=torch.bool, device=self.image_ids.device)
        if self.embeddings.dim() != 2 or self.locations.shape != (n, 2) or self.image_ids.shape != (n,) \
                or self.classes.shape != (n,) or self.stuff.shape != (n,):
            raise ValueError(
                "PixelSamples needs embeddings [N, D], locations [N, 2], image_ids, classes and stuff [N]; "
                f"got {tuple(self.embeddings.shape)}, {tuple(self.locations.shape)}, "
                f"{tuple(self.image_ids.shape)}, {tuple(self.classes.shape)}, {tuple(self.stuff.shape)}"
            )

    def __len__(self):
        return self.embeddings.shape[0]

    def __getitem__(self, index):
        return PixelSamples(self.embeddings[index], self.locations[index], self.image_ids[index],
                            self.classes[index], self.stuff[index])

    def stuff_classes(self):
        """[N] int64: the class of stuff samples, -1 for the others (what a stuff query's class is
        compared with)."""
        return torch.where(self.stuff, self.classes, torch.full_like(self.classes, -1))

    @staticmethod
    def empty(dim, dtype=torch.float32, device="cpu"):
        return PixelSamples(
            torch.zeros(0, dim, dtype=dtype, device=device),
            torch.zeros(0, 2, device=device),
            torch.zeros(0, dtype=torch.int64, device=device),
        )

    @staticmethod
    def cat(parts):
        return PixelSamples(
            torch.cat([p.embeddings for p in parts]),
            torch.cat([p.locations for p in parts]),
            torch.cat([p.image_ids for p in parts]),
            torch.cat([p.classes for p in parts]),
            torch.cat([p.stuff for p in parts]),
        )

    def detach(self):
        return PixelSamples(self.embeddings.detach(), self.locations, self.image_ids, self.classes, self.stuff)


def grid_locations(height, width, stride, device="cpu"):
    """(x, y) input-image positions of the cells of a stride-``stride`` map, [H * W, 2], row-major.

    Cell (i, j) sits at (j * stride + stride // 2, i * stride + stride // 2): the convention of
    detectron2 / AdelaiDet's ``compute_locations``, so the relative coordinates a CondInst head
    sees for a memory sample equal those it saw for the same pixel in its own image.
    """
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + stride // 2
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + stride // 2
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def masks_on_grid(masks, grid_size, stride):
    """Instance masks [N, h, w] at input resolution -> [N, H, W] on a stride-``stride`` grid,
    read at each cell's centre pixel (the cell's location in ``grid_locations``)."""
    hh, ww = grid_size
    padded = F.pad(masks, (0, ww * stride - masks.shape[-1], 0, hh * stride - masks.shape[-2]))
    return padded[:, stride // 2 :: stride, stride // 2 :: stride]


def _random_members(member, k, generator=None):
    """For each row of the bool matrix ``member`` [R, P], up to ``k`` random column indices where
    it is True (drawn from ``generator``, else the global generator). Returns (rows, cols) of the
    chosen entries, rows in order. One ``topk`` over random scores: no Python loop over rows."""
    if member.numel() == 0 or k == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=member.device)
        return empty, empty
    scores = torch.rand(member.shape, device=member.device, generator=generator)
    scores = scores.masked_fill_(~member, -1.0)
    values, cols = scores.topk(min(k, member.shape[1]), dim=1)
    rows = torch.arange(member.shape[0], device=member.device)[:, None].expand_as(cols)
    keep = values >= 0
    return rows[keep], cols[keep]


def sample_pixels(
    embeddings,
    instance_masks,
    image_ids,
    stride,
    strategy="instance",
    pixels_per_instance=50,
    pixels_per_image=1000,
    instance_classes=None,
    instance_stuff=None,
):
    """Draw foreground pixel samples from a batch's pixel-embedding map.

    Args:
        embeddings: [B, D, H, W] pixel embeddings of the (padded) batch.
        instance_masks: list of B bool tensors [N_b, H, W]: each image's instance masks on the
            embedding grid. Pixels outside every mask (background, padding) are never drawn.
        image_ids: [B] int64 dataset-level image ids.
        stride: input pixels per embedding cell.
        strategy: "instance" (up to ``pixels_per_instance`` random pixels inside each instance:
            the paper's instance-balanced sampling), "image" (up to ``pixels_per_image`` random
            foreground pixels per image) or "dense" (every foreground pixel).
        instance_classes: optional list of B int64 tensors [N_b], each mask's contiguous class id;
        instance_stuff: optional list of B bool tensors [N_b], whether that class is stuff (a stuff
            segment is sampled like an instance). A pixel drawn by "image" or "dense" takes the
            class of the first mask it is in. Without them every sample is an unknown thing.

    Returns:
        :class:`PixelSamples` whose embeddings stay attached to ``embeddings``' graph (callers
        use them as mini-batch negatives; the memory detaches what it stores).
    """
    b, d, h, w = embeddings.shape
    if len(instance_masks) != b or len(image_ids) != b:
        raise ValueError(
            f"sample_pixels: {b} embedding maps but {len(instance_masks)} mask sets and "
            f"{len(image_ids)} image ids"
        )
    for i, m in enumerate(instance_masks):
        if m.dim() != 3 or tuple(m.shape[1:]) != (h, w):
            raise ValueError(
                f"sample_pixels: masks of image {i} have shape {tuple(m.shape)}, expected "
                f"[N, {h}, {w}] (the embedding grid)"
            )
    device = embeddings.device
    image_ids = torch.as_tensor(image_ids, device=device, dtype=torch.int64)
    masks = [m.to(device=device, dtype=torch.bool).reshape(m.shape[0], h * w) for m in instance_masks]

    counts = [m.shape[0] for m in masks]
    classes = _per_mask(instance_classes, counts, -1, torch.int64, device)  # [sum N_b]
    stuff = _per_mask(instance_stuff, counts, False, torch.bool, device)
    if strategy == "instance":
        owner = torch.cat(
            [torch.full((m.shape[0],), i, device=device, dtype=torch.int64) for i, m in enumerate(masks)]
        )
        rows, pixels = _random_members(torch.cat(masks), pixels_per_instance)
        images = owner[rows]
    else:
        foreground = torch.stack([m.any(dim=0) for m in masks])  # [B, H*W]
        if strategy == "image":
            images, pixels = _random_members(foreground, pixels_per_image)
        elif strategy == "dense":
            images, pixels = foreground.nonzero(as_tuple=True)
        else:
            raise ValueError(f"Unknown sampling strategy {strategy!r}; use instance, image or dense")
        # the first mask of its image each drawn pixel is in
        offsets = torch.tensor([0] + counts, device=device).cumsum(0)[:-1]
        rows = _first_masks(masks, images, pixels) + offsets[images]

    return PixelSamples(
        embeddings.flatten(2)[images, :, pixels],  # [N, D], gathered without a copy of the whole map
        grid_locations(h, w, stride, device)[pixels],
        image_ids[images],
        classes[rows],
        stuff[rows],
    )


def _per_mask(values, counts, default, dtype, device):
    """Per-image lists of per-mask values as one tensor [sum N_b], or ``default`` for every mask."""
    if values is None:
        return torch.full((sum(counts),), default, dtype=dtype, device=device)
    if [len(v) for v in values] != counts:
        raise ValueError(f"sample_pixels: {[len(v) for v in values]} class entries for masks {counts}")
    return torch.cat([torch.as_tensor(v, dtype=dtype, device=device).reshape(-1) for v in values] +
                     [torch.zeros(0, dtype=dtype, device=device)])


def _first_masks(masks, images, pixels):
    """For each drawn (image, pixel), the index within its image of the first mask holding it [N]."""
    out = torch.zeros_like(pixels)
    for i, m in enumerate(masks):
        sel = (images == i).nonzero(as_tuple=True)[0]
        if len(sel) and len(m):
            out[sel] = m[:, pixels[sel]].int().argmax(0)
    return out
