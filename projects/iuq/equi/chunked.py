"""A sum of loss terms whose graphs never wait for backward.

A loss term computed late in the forward pass (IUQ's losses come after the base model's) adds
everything its graph saves to the step's peak memory: that peak is reached at the end of the
forward pass, when every activation is still held. When the term is a scalar sum over chunks,
each chunk can be differentiated as soon as it is computed, with respect to the term's inputs
only; its graph is then freed, and the term keeps nothing but one gradient per input until the
caller's backward, which just rescales those gradients and sends them on into the model. The
numbers are those of the plain computation up to the order in which floating-point terms are
summed.
"""
import torch


class _ChunkedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, term, num_chunks, *inputs):
        leaves = [
            t.detach().requires_grad_(needs) if torch.is_tensor(t) else t
            for t, needs in zip(inputs, ctx.needs_input_grad[2:])
        ]
        wrt = [t for t in leaves if torch.is_tensor(t) and t.requires_grad]
        grads = [torch.zeros_like(t) for t in wrt]
        total = None
        for k in range(num_chunks):
            with torch.enable_grad():
                value = term(k, *leaves)
            if wrt and value.requires_grad:
                for acc, g in zip(grads, torch.autograd.grad(value, wrt, allow_unused=True)):
                    if g is not None:
                        acc += g
            total = value.detach() if total is None else total + value.detach()
        ctx.has_grad = [torch.is_tensor(t) and t.requires_grad for t in leaves]
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if has else None for has in ctx.has_grad]
        return (None, None, *grads)


def chunked_sum(term, num_chunks, *inputs):
    """``sum_k term(k, *inputs)`` for k < ``num_chunks``, a scalar, differentiable in the tensor
    ``inputs`` as the plain sum is, but holding only one gradient per input for backward.

    ``term(k, *inputs)`` must return a scalar tensor and be a pure function of its arguments:
    anything else it reads (targets, a module's parameters) is a constant and gets no gradient.
    ``num_chunks`` must be >= 1.
    """
    if num_chunks < 1:
        raise ValueError(f"chunked_sum needs at least one chunk, got {num_chunks}")
    return _ChunkedSum.apply(term, num_chunks, *inputs)
