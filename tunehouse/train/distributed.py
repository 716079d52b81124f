"""Several training processes on one machine: the process group, rank-0 helpers, exact
cross-rank sums, each rank's share of a step's rows, and the model wrapped for them.

The worker starts N > 1 processes with torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the
environment); `setup()` joins them into one process group (NCCL on GPUs, gloo on a CPU) and
every recipe reads the result from there, so a recipe runs unchanged on 1 or N processes.

    LoRA          DDP over the adapter's gradients (the frozen base is replicated)
    full weights  FSDP2 `fully_shard`: each decoder layer, then the root (embeddings, norm, head)

Exactness: a step's global batch is split by rows (rank r takes rows r, r+N, r+2N, …), each
rank sums its token losses, and the divisor is the trained-token count summed over all ranks
(`sum_across`) before any backward. DDP and FSDP average gradients over ranks, so each rank's
loss is multiplied by N: the average is then the global token-weighted sum, the same gradient
one process computes over the whole batch (tests/test_train_distributed.py asserts the losses
equal to 1e-5).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

TIMEOUT_ENV = "TUNEHOUSE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800  # a rank silent this long fails its collective: the attempt fails, the job is requeued
# What gloo and NCCL say when a peer died or timed out (they raise plain RuntimeErrors).
_PEER_LOST = re.compile(r"gloo|nccl|processgroup|c10d|connection (reset|closed)|timed out", re.IGNORECASE)


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def started(self) -> str:
        """The TRAINING_START message: "Training started" (one process, as always), "Training
        started on 2 processes (gloo)", "… on 4 processes (nccl)"."""
        return "Training started" if self.world == 1 else f"Training started on {self.world} processes ({self.backend})"


def setup() -> Dist:
    """Join torchrun's process group (once per process; later calls return the same answer).
    Each rank trains on its own `cuda:LOCAL_RANK`, or on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank, device)


def is_main() -> bool:
    """Rank 0, or the only process (for code that has no Dist at hand: checkpoint files)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank died or hung."""
    return dist.is_initialized() and (isinstance(exc, dist.DistError) or bool(_PEER_LOST.search(str(exc))))


# -- exact sums and shares ------------------------------------------------------------------------

def sum_across(values: list[float], d: Dist) -> list[float]:
    """Element-wise sums over all ranks (float64, so token counts stay exact integers)."""
    if d.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def any_across(flag: bool, d: Dist) -> bool:
    """True on every rank when it is true on one: a cancel seen by any rank stops all of them
    before the same step, so none is left waiting in a collective."""
    return bool(sum_across([float(flag)], d)[0])


def micro_batches(n_rows: int, accumulation: int, d: Dist) -> list[list[int]]:
    """Indices (into a step's n_rows rows) of this rank's micro-batches.

    One process: the rows split into `accumulation` parts, as always. N processes: rank r takes
    rows r, r+N, … split into ceil(accumulation / N) parts, and every rank gets the same number
    of parts, some maybe empty (a step's last rows, 3 rows on 2 ranks): DDP and FSDP need every
    rank in every forward/backward, so an empty part runs a stand-in row with weight 0."""
    mine = torch.arange(d.rank, n_rows, d.world)
    parts = [idx.tolist() for idx in torch.tensor_split(mine, max(1, math.ceil(accumulation / d.world)))]
    return parts if d.world > 1 else [p for p in parts if p]


def gather_shares(local: torch.Tensor, n: int, d: Dist) -> torch.Tensor:
    """Rows computed as shares (rank r holds rows r, r+N, … of n, `share(range(n))`) → all n
    rows in order, on every rank (an all_gather of equal-sized, padded pieces)."""
    if d.world == 1:
        return local
    size = math.ceil(n / d.world)
    padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype, device=d.device)
    padded[:local.shape[0]] = local.to(d.device)
    pieces = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(pieces, padded)
    out = torch.stack(pieces, dim=1).reshape(size * d.world, *local.shape[1:])  # row i*N + r = rank r's i-th
    return out[:n].to(local.device)


def share(items: list, d: Dist) -> list:
    """This rank's items: r, r+N, r+2N, …"""
    return items[d.rank::d.world]


def broadcast(obj, d: Dist):
    """Rank 0's `obj` on every rank (pickled)."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=d.device if d.device.type == "cuda" else None)
    return box[0]


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# -- the model, wrapped ----------------------------------------------------------------------------

class PolicyForward(nn.Module):
    """The training forward as one module call, so DDP's and FSDP's hooks see it: decoder, then
    the LM head at trained positions only (`losses.target_logps`, or the logits with
    `logits=True`: `losses.trained_logits`)."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                index: torch.Tensor | None = None, logits: bool = False):
        from tunehouse.train.losses import target_logps, trained_logits

        return (trained_logits if logits else target_logps)(self.causal_lm, inputs, targets, index)


def wrap(causal_lm: nn.Module, *, lora: bool, autocast, d: Dist) -> nn.Module:
    """The module the recipe calls for training forwards: PolicyForward alone (one process),
    under DDP (LoRA) or FSDP2 (full weights). Call before building the optimizer: FSDP turns the
    parameters into shards (DTensors), and the optimizer must hold those."""
    policy = PolicyForward(causal_lm)
    if d.world == 1:
        return policy
    if lora:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are equal on every rank and never change: no broadcast per forward.
        return DistributedDataParallel(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                                       broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    # On GPUs under bf16 autocast: bf16 shards gathered for compute, gradients reduced in fp32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if (autocast is not None and d.device.type == "cuda") else MixedPrecisionPolicy()
    for layer in causal_lm.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    return fully_shard(policy, mesh=mesh, mp_policy=mp)  # root: embeddings, final norm, (tied) head


@contextlib.contextmanager
def gradient_sync(policy: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients across ranks only at a step's last micro-batch (accumulate locally before)."""
    if hasattr(policy, "no_sync") and not last:  # DDP
        with policy.no_sync():
            yield
        return
    if hasattr(policy, "set_requires_gradient_sync"):  # FSDP2
        policy.set_requires_gradient_sync(last)
    yield


# -- gathering shards for rank 0's checkpoint, and sharding them back -----------------------------

def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The module's whole state dict on rank 0 (CPU tensors), None on the others. Every rank must
    call it (each sharded tensor is all-gathered, one at a time, to bound memory). A tied weight
    (SmolLM2's embeddings = LM head) is one tensor under two names: kept under the first, as
    `save_pretrained` of the unsharded model does."""
    out, seen = {}, set()
    for name, value in module.state_dict(keep_vars=True).items():  # the parameters themselves: ties show
        if id(value) in seen:
            continue
        seen.add(id(value))
        full = _full(value)
        if is_main():
            out[name] = full.detach().to("cpu", copy=True)
    return out if is_main() else None


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict | None:
    """`optimizer.state_dict()` with sharded moments gathered: on rank 0 the same dict (same
    parameter numbering) one process writes; None on the others. Every rank must call it."""
    sd = optimizer.state_dict()
    state = {i: {k: _full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in sd["state"].items()}
    return {**sd, "state": state} if is_main() else None


def shard_optimizer_state(sd: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict (from any process count) cut to this rank's shards, for
    `optimizer.load_state_dict`; unchanged where the parameters are not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                    for k, v in s.items()}
    return {**sd, "state": state}


def shard_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into `param`, sharded or not."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(full.to(param.device), param.device_mesh, param.placements))
        else:
            param.copy_(full.to(param.device))


class NullReporter:
    """The reporter of ranks other than 0: writes nothing; stops when SIGTERM reached this rank
    (run.py sets `stop_signal`) or `delegate` (the caller's reporter) says so."""

    def __init__(self, delegate=None):
        self.delegate, self.stop_signal = delegate, False

    def event(self, *args, **kwargs) -> None:
        pass

    def metrics(self, step, values) -> None:
        pass

    def checkpoint(self, step, path, checkpoint_type) -> None:
        pass

    def should_stop(self) -> bool:
        return self.stop_signal or bool(self.delegate is not None and self.delegate.should_stop())


def rank_reporter(reporter, d: Dist):
    """The reporter itself on rank 0; a NullReporter (asking it only whether to stop) elsewhere."""
    return reporter if d.is_main else NullReporter(reporter)
