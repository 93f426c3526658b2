"""PixelMemory: the external memory of the inter-scene loss, a FIFO queue of pixel samples.

Like MoCo's key queue: a fixed-capacity ring buffer, written at ``ptr``, oldest entry overwritten
first. Each entry is one pixel of a past training image:

- ``embeddings`` [K, D]: its pixel embedding (detached; stored in ``dtype``),
- ``locations``  [K, 2]: its (x, y) position in input-image pixels (CondInst needs it for the
  relative coordinates of its dynamic head),
- ``image_ids``  [K]:    a dataset-level image id, so a query never takes a pixel of its own image
  (seen again in a later epoch or under another augmentation) as a negative;
- ``classes``    [K]:    the contiguous class id of the segment it was drawn from (-1: unknown),
- ``stuff``      [K]:    whether that class is stuff (panoptic: a stuff query's targets on other
  images are the pixels of its class, not zeros).

A checkpoint written before the memory carried classes (no ``classes`` / ``stuff``) loads with
every sample an unknown thing: every sample a negative, the instance-segmentation behaviour.

In a torch.distributed job every rank enqueues the all-gathered samples of all ranks, in rank
order, so all replicas hold the same memory. The memory is a training-time object only: it is
saved in training checkpoints (``state_dict``), never in the model.
"""
import torch
import torch.distributed as dist

from .samples import PixelSamples


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_samples(samples):
    """Concatenate the :class:`PixelSamples` of every rank, in rank order (uneven counts allowed)."""
    world = _world_size()
    if world == 1:
        return samples
    device = samples.embeddings.device
    count = torch.tensor([len(samples)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    longest = max(counts)

    def gather(t):
        padded = t.new_zeros((longest,) + tuple(t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    return PixelSamples(
        gather(samples.embeddings), gather(samples.locations), gather(samples.image_ids),
        gather(samples.classes), gather(samples.stuff),
    )


class PixelMemory:
    """A FIFO queue of at most ``capacity`` pixel samples; the embedding dim is set by the first
    enqueue (or by ``dim``). ``capacity == 0`` keeps nothing (mini-batch-only training)."""

    def __init__(self, capacity, dim=None, dtype=torch.float32, device="cpu"):
        if capacity < 0:
            raise ValueError(f"PixelMemory capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.dtype = dtype
        self.device = torch.device(device)
        self.ptr = 0  # next slot to write
        self.num_filled = 0
        self._buffers = None
        if dim is not None:
            self._allocate(dim)

    def _allocate(self, dim):
        k = self.capacity
        self._buffers = PixelSamples(
            torch.zeros(k, dim, dtype=self.dtype, device=self.device),
            torch.zeros(k, 2, dtype=torch.float32, device=self.device),
            torch.full((k,), -1, dtype=torch.int64, device=self.device),
            torch.full((k,), -1, dtype=torch.int64, device=self.device),
            torch.zeros(k, dtype=torch.bool, device=self.device),
        )

    @property
    def dim(self):
        return None if self._buffers is None else self._buffers.embeddings.shape[1]

    def __len__(self):
        return self.num_filled

    def samples(self):
        """The stored samples as :class:`PixelSamples` views ([num_filled, ...], slot order)."""
        if self._buffers is None:
            return PixelSamples.empty(self.dim or 0, self.dtype, self.device)
        return self._buffers[: self.num_filled]

    @torch.no_grad()
    def enqueue(self, samples, gather=True):
        """Append ``samples`` (all ranks' if ``gather``), overwriting the oldest entries."""
        if gather:
            samples = all_gather_samples(samples)
        if self.capacity == 0 or len(samples) == 0:
            return
        if self._buffers is None:
            self._allocate(samples.embeddings.shape[1])
        if samples.embeddings.shape[1] != self.dim:
            raise ValueError(
                f"PixelMemory holds {self.dim}-d embeddings, got {samples.embeddings.shape[1]}-d"
            )
        samples = samples[-self.capacity :]  # more than fit: only the newest survive a FIFO
        n = len(samples)
        slots = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        self._buffers.embeddings[slots] = samples.embeddings.to(self.device, self.dtype)
        self._buffers.locations[slots] = samples.locations.to(self.device, torch.float32)
        self._buffers.image_ids[slots] = samples.image_ids.to(self.device, torch.int64)
        self._buffers.classes[slots] = samples.classes.to(self.device, torch.int64)
        self._buffers.stuff[slots] = samples.stuff.to(self.device, torch.bool)
        self.ptr = (self.ptr + n) % self.capacity
        self.num_filled = min(self.num_filled + n, self.capacity)

    def chronological(self):
        """The stored samples, oldest first."""
        order = torch.arange(self.num_filled, device=self.device)
        if self.num_filled == self.capacity:
            order = (order + self.ptr) % self.capacity
        return self.samples()[order]

    def state_dict(self):
        stored = self.samples()
        return {
            "capacity": self.capacity,
            "ptr": self.ptr,
            "embeddings": stored.embeddings.cpu(),
            "locations": stored.locations.cpu(),
            "image_ids": stored.image_ids.cpu(),
            "classes": stored.classes.cpu(),
            "stuff": stored.stuff.cpu(),
        }

    def load_state_dict(self, state):
        """Restore a saved memory. With the same capacity the ring is restored slot for slot; with
        another capacity its newest ``min(saved, capacity)`` samples are enqueued oldest first. A
        state without ``classes`` / ``stuff`` (saved before the memory carried them) restores every
        sample as an unknown thing (-1, not stuff)."""
        missing = {"capacity", "ptr", "embeddings", "locations", "image_ids"} - set(state)
        if missing:
            raise KeyError(f"PixelMemory state_dict lacks {sorted(missing)}")
        saved = PixelSamples(state["embeddings"], state["locations"], state["image_ids"],
                             state.get("classes"), state.get("stuff"))
        self.ptr, self.num_filled, self._buffers = 0, 0, None
        if len(saved) == 0:
            return
        if state["capacity"] == self.capacity:
            self._allocate(saved.embeddings.shape[1])
            self._buffers.embeddings[: len(saved)] = saved.embeddings.to(self.device, self.dtype)
            self._buffers.locations[: len(saved)] = saved.locations.to(self.device)
            self._buffers.image_ids[: len(saved)] = saved.image_ids.to(self.device)
            self._buffers.classes[: len(saved)] = saved.classes.to(self.device)
            self._buffers.stuff[: len(saved)] = saved.stuff.to(self.device)
            self.num_filled, self.ptr = len(saved), int(state["ptr"])
            return
        ptr, cap = int(state["ptr"]), int(state["capacity"])
        if len(saved) == cap:  # full ring: oldest is at ptr
            order = (torch.arange(cap) + ptr) % cap
            saved = saved[order]
        self.enqueue(saved, gather=False)
