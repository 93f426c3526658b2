"""Several crops of one tensor whose gradients meet in one buffer.

In backward, every slice or select of a tensor makes a zero tensor of the whole input's size,
copies its gradient into it, and the autograd engine then adds that to the input's gradient. IUQ
reads the pixel-embedding map in several places (the originals, for the memory samples; each
view's source, for g(F)): for SOLOv2's [4, 256, H/4, W/4] map (250 MB at 800 px) plain slicing
would cost, per read, a full-size zero tensor and a full-size addition in backward (a few
percent of the step on CPU, and as many transient copies of the map). ``crops`` makes all the
reads one autograd node: one zero tensor, each crop's gradient added into its place.
"""
import torch


class _Crops(torch.autograd.Function):
    @staticmethod
    def forward(ctx, boxes, tensor):
        ctx.shape, ctx.boxes = tensor.shape, boxes
        ctx.set_materialize_grads(False)  # an unused crop sends None, not a zero tensor
        return tuple(tensor[box] for box in boxes)  # views: no copy

    @staticmethod
    def backward(ctx, *grads):
        out = None
        for box, grad in zip(ctx.boxes, grads):
            if grad is None:
                continue
            if out is None:
                out = grad.new_zeros(ctx.shape)
            out[box] += grad  # crops may overlap (two views of one image): their gradients add
        return None, out


def crops(tensor, boxes):
    """``[tensor[box] for box in boxes]`` (views), differentiable as plain indexing is, but with
    one gradient buffer for all of them. ``boxes``: basic indices (ints and slices, as tuples)."""
    for box in boxes:
        if not all(isinstance(i, (int, slice)) for i in (box if isinstance(box, tuple) else (box,))):
            raise TypeError(f"crops takes ints and slices only (basic indexing), got {box!r}")
    if not boxes:
        return []
    return list(_Crops.apply(list(boxes), tensor))
