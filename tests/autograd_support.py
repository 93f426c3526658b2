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
