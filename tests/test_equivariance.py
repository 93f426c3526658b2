"""The transform group's geometry: g(f(I)) == f(g(I)) for a translation-equivariant toy network,
for flips and crops of images whose sides are not multiples of the stride, in padded batches;
masks, boxes and images moved consistently; rotation and scaling at exact coordinates."""
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iuq.equi.transforms import (
    Crop,
    HFlip,
    Rotate,
    Scale,
    TransformList,
    sample_crop_box,
    sample_transform,
    valid_cells,
)

STRIDE = 4


class ToyNet(nn.Module):
    """Stride-4 stack of convolutions. Patchify convs (kernel = stride) are exactly
    translation-equivariant on the stride lattice; kernels are mirror-symmetric so the network
    also commutes with a horizontal flip. ``context`` adds a 3x3 conv (borders then differ)."""

    def __init__(self, context=False):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 8, 2, 2), nn.ReLU(), nn.Conv2d(8, 8, 2, 2), nn.ReLU(), nn.Conv2d(8, 5, 1)]
        if context:
            layers += [nn.ReLU(), nn.Conv2d(5, 5, 3, padding=1)]
        self.body = nn.Sequential(*layers).double()
        with torch.no_grad():
            for m in self.body:
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)

    def forward(self, x):
        return self.body(x)


def pad_batch(images, multiple=8, extra=0):
    """detectron2's ImageList.from_tensors: pad bottom / right with zeros to a common size."""
    h = max(i.shape[-2] for i in images) + extra
    w = max(i.shape[-1] for i in images) + extra
    h, w = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
    return torch.stack([F.pad(i, (0, w - i.shape[-1], 0, h - i.shape[-2])) for i in images])


SIZES = [(21, 30), (17, 25), (24, 32), (13, 9)]


def check_equivariance(net, transforms, sizes, margin=0):
    images = [torch.rand(3, *s, dtype=torch.float64) for s in sizes]
    feats = net(pad_batch(images))
    views = [g.apply_image(img) for g, img in zip(transforms, images)]
    view_feats = net(pad_batch(views, extra=5))  # views padded differently from the originals
    for b, (g, size) in enumerate(zip(transforms, sizes)):
        hc, wc = valid_cells(size, STRIDE)
        expected = g.apply_features(feats[b, :, :hc, :wc])
        vh, vw = valid_cells(g.out_size, STRIDE)
        got = view_feats[b, :, :vh, :vw]
        assert got.shape == expected.shape, (g, got.shape, expected.shape)
        inner = (slice(None), slice(margin, vh - margin), slice(margin, vw - margin))
        assert got[inner].numel() > 0
        torch.testing.assert_close(got[inner], expected[inner], rtol=1e-12, atol=1e-12)


def test_flip_commutes_with_the_network_on_unaligned_padded_images():
    check_equivariance(ToyNet(), [HFlip(s, STRIDE) for s in SIZES], SIZES)


def test_crop_commutes_with_the_network():
    rng = random.Random(0)
    for _ in range(10):
        transforms = [Crop(s, STRIDE, sample_crop_box(s, STRIDE, (0.6, 1.0), rng)) for s in SIZES]
        check_equivariance(ToyNet(), transforms, SIZES)


def test_sampled_flip_and_crop_compositions_commute_with_the_network():
    rng = random.Random(1)
    for _ in range(10):
        transforms = [sample_transform(s, STRIDE, ("flip", "crop"), (0.6, 1.0), rng=rng) for s in SIZES]
        assert all(t.is_exact for t in transforms)
        check_equivariance(ToyNet(), transforms, SIZES)


def test_with_spatial_context_the_interior_commutes():
    rng = random.Random(2)
    sizes = [(37, 45), (40, 33)]
    for _ in range(5):
        transforms = [sample_transform(s, STRIDE, ("flip", "crop"), (0.6, 1.0), rng=rng) for s in sizes]
        check_equivariance(ToyNet(context=True), transforms, sizes, margin=1)


def test_a_network_that_is_not_equivariant_is_caught():
    """Guard against a vacuous check: an asymmetric kernel breaks flip equivariance."""
    net = ToyNet()
    with torch.no_grad():
        net.body[0].weight[..., 0] += 1.0
    with pytest.raises(AssertionError):
        check_equivariance(net, [HFlip(s, STRIDE) for s in SIZES], SIZES)


def test_flip_moves_pixels_onto_the_mirrored_canvas_with_pad_value():
    img = torch.arange(2 * 3 * 6, dtype=torch.float32).reshape(2, 3, 6)  # w=6, canvas 8
    g = HFlip((3, 6), STRIDE)
    out = g.apply_image(img, pad_value=[-1.0, -2.0])
    assert g.out_size == (3, 8) and out.shape == (2, 3, 8)
    assert (out[0, :, :2] == -1).all() and (out[1, :, :2] == -2).all()
    # Pixel column x lands on column canvas_w - 1 - x.
    torch.testing.assert_close(out[:, :, 2:], img.flip(-1))


def rect_masks_and_boxes(size, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    masks, boxes = torch.zeros(n, h, w, dtype=torch.bool), []
    for k in range(n):
        x0, y0 = torch.randint(0, w - 2, (1,), generator=gen).item(), torch.randint(0, h - 2, (1,), generator=gen).item()
        x1 = torch.randint(x0 + 1, w + 1, (1,), generator=gen).item()
        y1 = torch.randint(y0 + 1, h + 1, (1,), generator=gen).item()
        masks[k, y0:y1, x0:x1] = True
        boxes.append([x0, y0, x1, y1])
    return masks, torch.tensor(boxes, dtype=torch.float32)


def tight_boxes(masks):
    out = []
    for m in masks:
        ys, xs = m.nonzero(as_tuple=True)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0])
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("seed", range(5))
def test_boxes_follow_their_masks(seed):
    size = (29, 38)
    masks, boxes = rect_masks_and_boxes(size, seed=seed)
    g = sample_transform(size, STRIDE, ("flip", "crop"), (0.5, 1.0), rng=random.Random(seed))
    new_masks, new_boxes = g.apply_masks(masks), g.apply_boxes(boxes)
    assert new_masks.shape[-2:] == g.out_size
    keep = new_masks.flatten(1).any(1)
    torch.testing.assert_close(new_boxes[keep], tight_boxes(new_masks[keep]))
    # Instances cropped away have empty boxes.
    assert ((new_boxes[~keep][:, 2] - new_boxes[~keep][:, 0]) * (new_boxes[~keep][:, 3] - new_boxes[~keep][:, 1]) == 0).all()


def test_crop_rejects_boxes_off_the_lattice():
    with pytest.raises(ValueError, match="stride-4 lattice"):
        Crop((20, 20), STRIDE, (2, 0, 20, 20))
    Crop((21, 22), STRIDE, (4, 8, 21, 22))  # right / bottom edges on the image's own edge


def test_crop_box_sampling_respects_the_relative_size():
    rng = random.Random(0)
    size = (800, 1216)
    cells = valid_cells(size, 8)
    for _ in range(200):
        y0, x0, y1, x1 = sample_crop_box(size, 8, (0.6, 1.0), rng)
        assert y0 % 8 == 0 and x0 % 8 == 0
        for lo, hi, n in ((y0, y1, cells[0]), (x0, x1, cells[1])):
            assert 0.6 - 1 / n <= math.ceil((hi - lo) / 8) / n <= 1.0


def test_rotation_by_90_degrees_moves_images_masks_boxes_and_features_like_rot90():
    img = torch.rand(3, 16, 16)
    g = Rotate((16, 16), STRIDE, 90.0)
    torch.testing.assert_close(g.apply_image(img), torch.rot90(img, 1, (1, 2)), rtol=0, atol=1e-5)
    feats = torch.rand(5, 4, 4)
    torch.testing.assert_close(g.apply_features(feats), torch.rot90(feats, 1, (1, 2)), rtol=0, atol=1e-5)
    masks, boxes = rect_masks_and_boxes((16, 16))
    rotated = g.apply_masks(masks)
    assert torch.equal(rotated, torch.rot90(masks, 1, (1, 2)))
    torch.testing.assert_close(g.apply_boxes(boxes), tight_boxes(rotated), rtol=0, atol=1e-4)


def test_rotation_fills_uncovered_corners_with_pad_value():
    img = torch.ones(3, 20, 20)
    out = Rotate((20, 20), STRIDE, 45.0).apply_image(img, pad_value=[0.5, 0.5, 0.5])
    assert out[:, 0, 0].tolist() == [0.5, 0.5, 0.5] and out[:, 10, 10].tolist() == [1, 1, 1]


def test_scale_matches_bilinear_resize_at_exact_coordinates():
    img = torch.rand(3, 12, 20)
    g = Scale((12, 20), STRIDE, 2.0)
    assert g.out_size == (24, 40)
    ref = F.interpolate(img[None], size=(24, 40), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(g.apply_image(img), ref, rtol=0, atol=1e-5)
    feats = torch.rand(5, 3, 5)
    ref = F.interpolate(feats[None], size=(6, 10), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(g.apply_features(feats), ref, rtol=0, atol=1e-5)


def test_supplementary_transforms_compose_and_report_inexact():
    g = sample_transform((30, 40), STRIDE, ("flip", "crop", "rotation", "scale"), rng=random.Random(3))
    assert isinstance(g, TransformList) and not g.is_exact
    out = g.apply_features(torch.rand(2, *valid_cells((30, 40), STRIDE)))
    assert out.shape[-2:] == valid_cells(g.out_size, STRIDE)


def test_wrong_feature_size_is_named():
    with pytest.raises(ValueError, match=r"features of spatial size \(6, 8\)"):
        HFlip((21, 30), STRIDE).apply_features(torch.rand(2, 6, 7))


def test_unknown_transform_is_named():
    with pytest.raises(ValueError, match="shear"):
        sample_transform((30, 40), STRIDE, ("flip", "shear"))
