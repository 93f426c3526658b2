"""Pixel sampling: K per instance, never background, right embeddings / locations / image ids."""
import pytest
import torch

from iuq.inter.samples import grid_locations, sample_pixels


def coded_map(b, h, w):
    """Embeddings [B, 3, H, W] whose value at (b, i, j) is (b, i, j): each sample names its pixel."""
    bb, ii, jj = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([bb, ii, jj], dim=1).float()


def toy_batch():
    h, w = 6, 8
    m0 = torch.zeros(3, h, w, dtype=torch.bool)
    m0[0, 0:2, 0:2] = True  # 4 pixels
    m0[1, 2:6, 0:8] = True  # 32 pixels
    m0[2, 0, 7] = True  # 1 pixel
    m1 = torch.zeros(1, h, w, dtype=torch.bool)
    m1[0, 1:4, 1:4] = True  # 9 pixels
    return coded_map(2, h, w), [m0, m1], torch.tensor([17, 42])


def owners(samples, masks):
    """For each sample, the (image, instance) pairs whose mask contains its pixel."""
    out = []
    for e in samples.embeddings.long().tolist():
        b, i, j = e
        out.append([(b, n) for n in range(masks[b].shape[0]) if masks[b][n, i, j]])
    return out


def test_instance_sampling_takes_k_per_instance_and_no_background():
    torch.manual_seed(0)
    emb, masks, ids = toy_batch()
    s = sample_pixels(emb, masks, ids, stride=8, strategy="instance", pixels_per_instance=5)
    assert len(s) == 4 + 5 + 1 + 5  # min(K, area) for each of the four instances
    own = owners(s, masks)
    assert all(own), "a background pixel was sampled"
    # Each instance contributes min(K, area) distinct pixels of its own.
    b_i_j = [tuple(e) for e in s.embeddings.long().tolist()]
    assert len(set(b_i_j[:4])) == 4 and len(set(b_i_j[4:9])) == 5
    # Image ids follow the pixel's image; locations are the cell centres at stride 8.
    assert s.image_ids.tolist() == [ids[b].item() for b, _, _ in b_i_j]
    expected_xy = [[j * 8 + 4, i * 8 + 4] for _, i, j in b_i_j]
    assert s.locations.tolist() == expected_xy


def test_instance_sampling_is_random_within_the_instance():
    emb, masks, ids = toy_batch()
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        s = sample_pixels(emb, masks, ids, stride=4, strategy="instance", pixels_per_instance=1)
        seen.add(tuple(s.embeddings[1].long().tolist()))  # the 32-pixel instance's sample
    assert len(seen) > 5


def test_image_sampling_caps_per_image_and_stays_on_foreground():
    torch.manual_seed(1)
    emb, masks, ids = toy_batch()
    s = sample_pixels(emb, masks, ids, stride=8, strategy="image", pixels_per_image=10)
    per_image = torch.bincount(s.embeddings[:, 0].long(), minlength=2).tolist()
    assert per_image == [10, 9]  # image 1 has only 9 foreground pixels
    assert all(owners(s, masks))
    assert len(set(map(tuple, s.embeddings.long().tolist()))) == len(s)  # no repeats


def test_dense_sampling_takes_every_foreground_pixel_once():
    emb, masks, ids = toy_batch()
    s = sample_pixels(emb, masks, ids, stride=8, strategy="dense")
    foreground = sum(int(m.any(0).sum()) for m in masks)
    assert len(s) == foreground == 4 + 32 + 1 + 9 - 0
    assert all(owners(s, masks))


def test_samples_keep_the_gradient_path_to_the_embedding_map():
    emb, masks, ids = toy_batch()
    emb.requires_grad_(True)
    s = sample_pixels(emb, masks, ids, stride=8, strategy="dense")
    s.embeddings.sum().backward()
    fg = torch.stack([m.any(0) for m in masks])  # [B, H, W]
    assert torch.equal(emb.grad.sum(1) != 0, fg)


def test_image_without_instances_contributes_nothing():
    emb, masks, ids = toy_batch()
    masks[1] = masks[1][:0]
    s = sample_pixels(emb, masks, ids, stride=8, strategy="instance", pixels_per_instance=3)
    assert set(s.image_ids.tolist()) == {17}


def test_mask_grid_mismatch_names_the_image():
    emb, masks, ids = toy_batch()
    masks[1] = torch.zeros(1, 5, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="image 1"):
        sample_pixels(emb, masks, ids, stride=8)


def test_unknown_strategy_is_named():
    emb, masks, ids = toy_batch()
    with pytest.raises(ValueError, match="sparse"):
        sample_pixels(emb, masks, ids, stride=8, strategy="sparse")


def test_grid_locations_match_adelaidet_convention():
    loc = grid_locations(2, 3, stride=8)
    assert loc.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
