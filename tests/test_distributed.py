"""Distributed training of rewritten models: two CPU processes (gloo) training a captured,
rewritten GraphModule under DDP and under FSDP2 (`fully_shard`) see, step for step, the losses
one process sees training the same model on the same global batch (within 1e-5 relative).

Models: tiny Llama after `altup(k=2),expand-mlp(factor=2)` (saved as an archfx artifact and
loaded by every rank, as docs/distributed.md does) and a byte-level GPT-2 after
`expand-hidden(factor=2),ddl(dv=1)` (rebuilt by every rank), trained with AdamW on Hamlet. FSDP2 shards the whole
GraphModule as one group: the flattened graph reads every block's parameters with get_attr from
the root's forward, so a block module's own forward — where `fully_shard(block)` would gather
its parameters — never runs (docs/distributed.md).
"""

import functools
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from archfx.passes import Pipeline
from archfx.passes.io.artifact import load, save
from archfx.passes.io.zoo import build

from .helpers import byte_gpt, captured, hamlet

WORLD = 2
STEPS = 5
BATCH = 8  # global: 4 sequences per process
CASES = {
    "llama-altup-mlp": ("tiny-llama", "altup(k=2),expand-mlp(factor=2)"),
    "gpt2-hidden-ddl": ("byte-gpt2", "expand-hidden(factor=2),ddl(dv=1)"),
}
WRAPS = ("ddp", "fsdp2")


def rewritten(case: str, verify: bool = False):
    """The rewritten model's Graph (the same weights in every process: seeded draws)."""
    name, pipeline = CASES[case]
    if name == "byte-gpt2":
        return byte_gpt(pipeline)
    result = Pipeline.parse(pipeline).run(captured(name), verify=verify)
    if verify:
        assert all(r.certificate.ok for r in result.records)
    return result.graph


def save_artifacts(root: Path) -> dict[str, str]:
    """The zoo cases saved as archfx artifacts, as docs/distributed.md does before launching:
    every rank loads the same weights from disk."""
    out = {}
    for case, (name, pipeline) in CASES.items():
        if name != "byte-gpt2":
            save(
                rewritten(case),
                root / case,
                source={"kind": "builtin", "name": name},
                pipeline=pipeline,
                model=build(name),
            )
            out[case] = str(root / case)
    return out


def batches(case: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS + 1 global batches of Hamlet bytes (the last one for a loss after training)."""
    data = hamlet(BATCH, 32, seed=0)
    vocab = 128 if CASES[case][0] == "tiny-llama" else 256
    return [tuple(t % vocab for t in next(data)) for _ in range(STEPS + 1)]


def train(module, data, rank: int = 0, world: int = 1) -> list[float]:
    """AdamW steps on this process's share of each global batch; the global mean loss of every
    step, then of the held-out last batch after the final update."""
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for step, (x, y) in enumerate(data):
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        logits = module(x)[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        if step < len(data) - 1:
            opt.zero_grad()
            loss.backward()
            opt.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    return losses


def _worker(rank: int, world: int, port: int, out: str, artifacts: dict[str, str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for case in CASES:
            for wrap in WRAPS:
                gm = load(artifacts[case]).gm if case in artifacts else rewritten(case).gm
                module = (
                    DistributedDataParallel(gm) if wrap == "ddp" else fully_shard(gm, mesh=mesh)
                )
                losses = train(module, batches(case), rank, world)
                if rank == 0:
                    with open(os.path.join(out, f"{case}.{wrap}.json"), "w") as f:
                        json.dump(losses, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_losses(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("distributed")
    artifacts = save_artifacts(out)
    mp.start_processes(
        _worker,
        args=(WORLD, _free_port(), str(out), artifacts),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    return {
        (case, wrap): json.loads((out / f"{case}.{wrap}.json").read_text())
        for case in CASES
        for wrap in WRAPS
    }


@functools.cache
def single_process(case: str) -> list[float]:
    torch.manual_seed(0)
    return train(rewritten(case, verify=True).gm, batches(case))


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_train_like_one(case, wrap, distributed_losses):
    ref = single_process(case)
    got = distributed_losses[(case, wrap)]
    assert ref[-1] < ref[0] - 0.1, ref  # it learns
    assert len(got) == len(ref) == STEPS + 1
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), (case, wrap, step, got, ref)
