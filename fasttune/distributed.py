"""Saving from a run under torchrun / accelerate (DDP or FSDP2): one writer, whole weights.

fasttune has no launcher or collectives of its own; this module only makes the save functions behave in a process
group the way a script written for one GPU expects:

* Under DDP every rank holds the whole model. A script that calls ``model.save_pretrained_merged(...)`` on every
  rank (a ported notebook does) would have each rank write the same folder; only global rank 0 writes, and the
  other ranks return ``None`` without waiting, so a call guarded by ``if trainer.is_world_process_zero()`` also
  works.
* Under FSDP2 each rank holds a shard of every weight (``DTensor`` parameters). A save is then collective: every
  rank must call it. Each FSDP unit is all-gathered (``FSDPModule.unshard``), rank 0 writes from the whole weights,
  the units are resharded, and every rank returns rank 0's result. Called from rank 0 alone it would wait for the
  others forever, so every save starts with a barrier that fails with a clear error instead: after
  ``ARRIVAL_TIMEOUT`` under gloo (a monitored barrier), after the process group's own timeout under NCCL.
"""

from __future__ import annotations

import datetime
import functools
import logging
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("fasttune")

F = TypeVar("F", bound=Callable[..., Any])

# How long a collective save waits for every rank to arrive before it fails (a save called on rank 0 only).
ARRIVAL_TIMEOUT = datetime.timedelta(seconds=120)

_inside = False  # a save inside a save (push_to_hub_merged -> save_pretrained_merged) is already handled


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process's default group, ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (some parameter is a DTensor, as ``fully_shard`` leaves them)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def full_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Every FSDP2 unit of ``model`` all-gathered for the duration (collective: call on every rank), resharded after.

    Inside, each module's parameters are the whole tensors, as in a one-process model. A 4-bit weight comes back as
    a plain tensor over its packed bytes; bitsandbytes keeps its quantization state on the module, where fasttune's
    ``dequantize_weight`` reads it.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    with torch.no_grad():
        for unit in units:
            unit.unshard()
        try:
            yield model
        finally:
            for unit in units:
                unit.reshard()


def _all_arrived(name: str, rank: int, size: int) -> None:
    """A barrier that fails instead of hanging when some rank never calls ``name``."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=ARRIVAL_TIMEOUT, wait_all_ranks=True)
        else:  # NCCL has no monitored barrier: its own timeout ends the wait
            dist.barrier()
    except RuntimeError as err:
        raise RuntimeError(
            f"{name}: the model is sharded by FSDP2 ({size} ranks), so saving is collective: call {name} on every "
            f"rank (not only under `if trainer.is_world_process_zero()`); rank 0 writes the files. "
            f"Rank {rank} waited {ARRIVAL_TIMEOUT.total_seconds():.0f} s: {err}"
        ) from err


def _on_rank_zero(name: str, write: Callable[[], Any]) -> Any:
    """Run ``write()`` on rank 0 and hand its result, or its failure, to every rank (no rank is left waiting)."""
    global _inside
    rank = dist.get_rank()
    outcome: list[Any] = [None, None]  # result, error text
    failure: Exception | None = None
    if rank == 0:
        _inside = True
        try:
            outcome[0] = write()
        except Exception as err:  # re-raised below, once every rank has the news
            failure, outcome[1] = err, f"{type(err).__name__}: {err}"
        finally:
            _inside = False
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise RuntimeError(f"{name} failed on rank 0: {outcome[1]}")
    return outcome[0]


def _save_once(name: str, model: nn.Module, write: Callable[[], Any], write_sharded: Callable[[], Any]) -> Any:
    """The dispatch every save shares: one process (or a save inside a save) writes; an unsharded model under DDP is
    written by rank 0 while the others return None; a sharded one, once every rank arrived, by ``write_sharded``."""
    rank, size = world()
    if size == 1 or _inside:
        return write()
    if not is_sharded(model):
        if rank != 0:
            logger.info("%s: rank %d of %d skips; rank 0 writes", name, rank, size)
            return None
        return write()
    _all_arrived(name, rank, size)
    return write_sharded()


def one_writer(fn: F) -> F:
    """Decorate a save function ``fn(model, ...)`` to run as described in the module docstring."""

    @functools.wraps(fn)
    def save(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        def write() -> Any:
            return fn(model, *args, **kwargs)

        def write_sharded() -> Any:
            with full_weights(model):
                return _on_rank_zero(fn.__name__, write)

        return _save_once(fn.__name__, model, write, write_sharded)

    return save  # type: ignore[return-value]


def _gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights ``save_pretrained`` writes, whole, on rank 0 (collective; other ranks get an empty dict).

    A peft model writes only its trainable weights (the adapters), so only those are gathered, not the base model.
    FSDP2's ``state_dict()`` returns the DTensor shards even inside ``full_weights``, so the state dict is passed.
    """
    from peft import PeftModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if not isinstance(model, PeftModel):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank = dist.get_rank()
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:  # every rank, in the same order: full_tensor() is a collective
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            if rank == 0:
                state[name] = whole.detach().cpu()
    return state


def _save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's ``save_pretrained``, written once under DDP and from the whole weights under FSDP2
    (``fasttune.distributed``). A call that passes ``state_dict`` (the Trainer's checkpoint save, which gathered its
    own) goes straight to the class's method on every rank."""
    save = type(self).save_pretrained
    if "state_dict" in kwargs:
        return save(self, *args, **kwargs)

    def write_sharded() -> Any:
        state = _gathered_state_dict(self)  # collective: every rank, before rank 0 writes
        return _on_rank_zero("save_pretrained", lambda: save(self, *args, state_dict=state, **kwargs))

    return _save_once("save_pretrained", self, lambda: save(self, *args, **kwargs), write_sharded)


def bind_save_pretrained(model: nn.Module) -> None:
    """Bind ``_save_pretrained`` on this instance (a bound method, so ``copy.deepcopy(model)`` binds the copy's)."""
    model.save_pretrained = types.MethodType(_save_pretrained, model)
