"""PixelMemory: FIFO order, wrap-around, capacity 0, checkpoint round trip, dtypes, and identical
memories on every rank of a two-process Gloo job."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iuq.inter.memory import PixelMemory
from iuq.inter.samples import PixelSamples


def make_samples(values, dim=3, image_id=None, dtype=torch.float32):
    """Samples whose embedding rows are filled with ``values`` (so each row is identifiable)."""
    v = torch.as_tensor(values, dtype=torch.float32)
    ids = v.long() if image_id is None else torch.full_like(v, image_id).long()
    return PixelSamples(v[:, None].repeat(1, dim).to(dtype), torch.stack([v, -v], 1), ids)


def tags(samples):
    return samples.embeddings[:, 0].float().tolist()


def test_fifo_order_and_wrap_around():
    mem = PixelMemory(capacity=5)
    mem.enqueue(make_samples([1, 2, 3]))
    assert tags(mem.samples()) == [1, 2, 3] and mem.ptr == 3 and len(mem) == 3
    mem.enqueue(make_samples([4, 5, 6, 7]))
    # Slots 3, 4 take 4, 5; then 6, 7 wrap around onto slots 0, 1 (the oldest, 1 and 2).
    assert tags(mem.samples()) == [6, 7, 3, 4, 5]
    assert tags(mem.chronological()) == [3, 4, 5, 6, 7]
    assert mem.ptr == 2 and len(mem) == 5
    assert mem.samples().locations[:, 1].tolist() == [-6, -7, -3, -4, -5]
    assert mem.samples().image_ids.tolist() == [6, 7, 3, 4, 5]


def test_enqueue_more_than_capacity_keeps_the_newest():
    mem = PixelMemory(capacity=4)
    mem.enqueue(make_samples([1]))
    mem.enqueue(make_samples(list(range(10, 20))))
    assert tags(mem.chronological()) == [16, 17, 18, 19]


def test_capacity_zero_is_mini_batch_only():
    mem = PixelMemory(capacity=0)
    mem.enqueue(make_samples([1, 2]))
    assert len(mem) == 0 and len(mem.samples()) == 0


def test_dimension_mismatch_is_an_error():
    mem = PixelMemory(capacity=4)
    mem.enqueue(make_samples([1], dim=8))
    with pytest.raises(ValueError, match="8-d"):
        mem.enqueue(make_samples([1], dim=16))


def test_stored_samples_are_detached_copies():
    emb = torch.ones(2, 3, requires_grad=True)
    mem = PixelMemory(capacity=4)
    mem.enqueue(PixelSamples(emb * 2, torch.zeros(2, 2), torch.tensor([0, 1])))
    assert not mem.samples().embeddings.requires_grad
    assert mem.samples().embeddings.sum().item() == 12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage_and_input(dtype):
    mem = PixelMemory(capacity=3, dtype=dtype)
    mem.enqueue(make_samples([0.5, 1.25], dtype=torch.float16))
    assert mem.samples().embeddings.dtype == dtype
    assert tags(mem.samples()) == [0.5, 1.25]
    assert mem.samples().locations.dtype == torch.float32


def test_state_dict_round_trip_restores_slots_and_pointer():
    mem = PixelMemory(capacity=5)
    mem.enqueue(make_samples([1, 2, 3, 4, 5, 6, 7]))
    restored = PixelMemory(capacity=5)
    restored.load_state_dict(mem.state_dict())
    assert tags(restored.samples()) == tags(mem.samples()) and restored.ptr == mem.ptr
    assert torch.equal(restored.samples().locations, mem.samples().locations)
    assert torch.equal(restored.samples().image_ids, mem.samples().image_ids)
    # Both continue identically.
    for m in (mem, restored):
        m.enqueue(make_samples([8, 9]))
    assert tags(restored.samples()) == tags(mem.samples())


def test_state_dict_survives_torch_save(tmp_path):
    mem = PixelMemory(capacity=6)
    mem.enqueue(make_samples([1, 2, 3]))
    torch.save({"iuq_memory": mem.state_dict()}, tmp_path / "ckpt.pth")
    restored = PixelMemory(capacity=6)
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True)["iuq_memory"])
    assert tags(restored.chronological()) == [1, 2, 3] and restored.ptr == 3


def test_loading_into_another_capacity_keeps_the_newest_in_order():
    mem = PixelMemory(capacity=5)
    mem.enqueue(make_samples([1, 2, 3, 4, 5, 6, 7]))  # holds 3..7
    smaller = PixelMemory(capacity=3)
    smaller.load_state_dict(mem.state_dict())
    assert tags(smaller.chronological()) == [5, 6, 7]
    larger = PixelMemory(capacity=10)
    larger.load_state_dict(mem.state_dict())
    assert tags(larger.chronological()) == [3, 4, 5, 6, 7]


def test_incomplete_state_dict_is_named():
    with pytest.raises(KeyError, match="ptr"):
        PixelMemory(capacity=3).load_state_dict({"capacity": 3, "embeddings": torch.zeros(0, 2),
                                                 "locations": torch.zeros(0, 2), "image_ids": torch.zeros(0)})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        mem = PixelMemory(capacity=7)
        # Uneven counts: rank 0 sends 3 samples per step, rank 1 sends 1.
        for step in range(3):
            n = 3 if rank == 0 else 1
            values = [100 * rank + 10 * step + i for i in range(n)]
            mem.enqueue(make_samples(values))
        torch.save(mem.state_dict(), os.path.join(out_dir, f"rank{rank}.pth"))
    finally:
        # No destroy_process_group(): with Gloo it can hang when ranks reach it at different
        # times (seen here); the processes exit right after, which releases the group.
        dist.barrier()


def test_two_gloo_ranks_hold_identical_memories(tmp_path):
    port = _free_port()
    ctx = mp.start_processes(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):  # fail, never hang, if a rank gets stuck
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two Gloo ranks did not finish within 120 s")
    states = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2)]
    for key in ("embeddings", "locations", "image_ids"):
        assert torch.equal(states[0][key], states[1][key])
    assert states[0]["ptr"] == states[1]["ptr"]
    restored = PixelMemory(capacity=7)
    restored.load_state_dict(states[0])
    # 12 samples went in, rank 0's before rank 1's each step; the newest 7 remain, oldest first.
    assert tags(restored.chronological()) == [11, 12, 110, 20, 21, 22, 120]
