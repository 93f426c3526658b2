"""What autograd holds for backward, for the tests of IUQ's memory-lean losses."""
import weakref

import torch


def saved_bytes(fn):
    """(fn(), bytes of distinct storages autograd still holds for backward once ``fn`` has built
    its graph); tensors saved by graphs that ``fn`` built and freed internally are not counted."""
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    alive = [r() for r in saved if r() is not None]
    return out, sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}.values())


def iuq_gradients(loss, query_side, embedding_side):
    """(d loss / d query_side, d loss / d embedding_side) of two parameters, None where ``loss``
    does not depend on one."""
    return torch.autograd.grad(loss, [query_side, embedding_side], retain_graph=True, allow_unused=True)


def check_iuq_loss_reaches(key, grads, names, model):
    """The integration tests' "each IUQ loss reaches ..." check, on ``grads`` = (query-side,
    embedding-side) gradients of ``key`` (``iuq_gradients``; ``names``: what the two are). Both
    losses reach the query side. ``loss_equi`` reaches the embedding side (g(F)); ``loss_inter``
    reaches it only through the batch's own samples as negatives, which the default detaches
    (``MODEL.IUQ.INTER.DETACH_NEGATIVES``, Algorithm 1): it then trains the queries alone
    (the attached path: ``tests/test_open_choices*.py``)."""
    query, embedding = grads
    assert query is not None and torch.isfinite(query).all() and query.abs().sum() > 0, \
        f"{model}: {key} does not reach the {names[0]}"
    if key == "loss_inter":
        assert embedding is None or not embedding.abs().sum(), f"{model}: detached, {key} reaches the {names[1]}"
    else:
        assert embedding is not None and torch.isfinite(embedding).all() and embedding.abs().sum() > 0, \
            f"{model}: {key} does not reach the {names[1]}"
