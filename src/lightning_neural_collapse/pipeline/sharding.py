"""Sharded parameters (FSDP1, FSDP2, DeepSpeed ZeRO-3): telling them apart from host metadata, and gathering them.

Under sharding a parameter is not the full tensor on every rank: FSDP2 gives a ``DTensor`` (global shape, local
shard), FSDP1 a view of a flat shard (empty on some ranks), ZeRO-3 an empty placeholder outside forward. The
predicates here read only host metadata (no collective), so they may run inside a training step;
:func:`full_parameters` gathers, a collective that every rank must enter at the same moment, outside forward and
backward (the callback does so when a measurement finishes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

from torch import nn


@contextmanager
def full_parameters(module: nn.Module, model: nn.Module | None = None) -> Iterator[None]:
    """Inside, ``module``'s own parameters are full (unsharded) on every rank; read them, do not write them.

    - FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``): a parameter is a ``DTensor``, gathered by
      reading it through ``full_tensor()`` (this context leaves it as it is).
    - FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``): every FSDP root of ``model`` (default
      ``module``) in ``summon_full_params(writeback=False)``; without CPU offload, which crashes on CPU shards.
    - DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters(..., modifier_rank=None)`` of the module's parameters.

    Each is a collective: every rank must enter, in the same order. Plain parameters: nothing happens.
    """
    with ExitStack() as stack:
        roots = _fsdp1_roots(model if model is not None else module)
        if roots:
            from torch.distributed.fsdp import FullyShardedDataParallel

            for root in roots:
                stack.enter_context(FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True))
        zero = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
        if zero:
            import deepspeed  # present whenever a parameter carries a ZeRO id

            stack.enter_context(deepspeed.zero.GatheredParameters(zero, modifier_rank=None))
        yield


def is_sharded(module: nn.Module, model: nn.Module | None = None) -> bool:
    """Whether ``module``'s own parameters are sharded (a ``DTensor``, a ZeRO-3 placeholder, or FSDP1 anywhere in
    ``model``): their local shapes are not the model's, so shape checks must wait for :func:`full_parameters`.

    Example:
        >>> is_sharded(nn.Linear(2, 3))
        False
    """
    return _any_sharded(module.parameters(recurse=False)) or bool(_fsdp1_roots(model if model is not None else module))


def model_is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is sharded (FSDP1, FSDP2 or ZeRO-3): its forward is then a collective."""
    return _any_sharded(model.parameters()) or bool(_fsdp1_roots(model))


def _any_sharded(parameters: Iterable[nn.Parameter]) -> bool:
    """Whether one of ``parameters`` is an FSDP2 ``DTensor`` (``full_tensor``) or a ZeRO-3 one (``ds_id``)."""
    return any(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in parameters)


def _fsdp1_roots(model: nn.Module) -> list[nn.Module]:
    """The outermost ``FullyShardedDataParallel`` modules of ``model`` (FSDP1), empty without any."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return []
    return list(FullyShardedDataParallel.fsdp_modules(model, root_only=True))
