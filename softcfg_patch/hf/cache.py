"""The SoftCFG caches for `transformers` decoders: `DynamicCache` / `StaticCache` subclasses
that store K/V unscaled and return from `update()` the values (target "v"), keys ("k") or
both ("kv") multiplied by the one `MultiplierTable` (softcfg_patch.cache).

The table is all ones except where `set_multipliers` wrote the unconditional rows, so the
conditional rows and the prompt positions come back bit for bit.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from ..cache import MultiplierTable
from ..guidance import Guidance, runs_softcfg

Rows = Union[torch.Tensor, Sequence[int]]

__all__ = ["SoftCFGCache", "SoftCFGStaticCache", "MultiplierCache", "make_cache", "Rows"]


class MultiplierCache:
    """What both SoftCFG caches add to their transformers cache: the one `MultiplierTable`
    (softcfg_patch.cache), applied in `update()`.

    The table is written in place (`set_multipliers`) so a compiled forward that reads
    it sees new values without recompiling; the stored K/V are never modified, so
    multipliers cannot compound across steps.
    """

    def _init_softcfg(self, target: str, enabled: bool) -> None:
        MultiplierTable(0, 0, target)  # validates the target before anything is allocated
        self.softcfg_target = target
        self.softcfg_enabled = bool(enabled)
        self.multipliers: Optional[MultiplierTable] = None

    @property
    def multiplier_table(self) -> Optional[torch.Tensor]:
        return None if self.multipliers is None else self.multipliers.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not self.softcfg_enabled:
            return keys, values
        table = self._table(keys.shape[0], keys.shape[-2], keys.device)
        weights = table.values[:, None, : keys.shape[-2], None]  # broadcast over heads, head_dim
        if table.scale_k:
            keys = (keys * weights).to(keys.dtype)  # product in float32, one rounding
        if table.scale_v:
            values = (values * weights).to(values.dtype)
        return keys, values

    def set_multipliers(self, rows: Rows, start: int, values: torch.Tensor) -> None:
        """Write multipliers of positions [start, start + values.shape[1]) for `rows`, in place."""
        if self.multipliers is None:
            raise RuntimeError("set_multipliers before the first forward: run the prompt through "
                               "the model with this cache first")
        table = self._table(self.multipliers.values.shape[0], start + values.shape[1],
                            self.multipliers.values.device)
        rows = torch.as_tensor(rows, dtype=torch.long, device=table.values.device)
        table.write(rows, start, values.to(table.values.device))

    def reset_multipliers(self) -> None:
        if self.multipliers is not None:
            self.multipliers.reset()

    def reset(self) -> None:
        super().reset()
        self.reset_multipliers()

    def _table(self, rows: int, length: int, device: torch.device) -> MultiplierTable:
        table = self.multipliers
        if table is None:
            table = MultiplierTable(rows, self._initial_capacity(length), self.softcfg_target, device)
            if not torch.compiler.is_compiling():
                # a fixed address lets compiled graphs / cuda graphs read the live table
                torch._dynamo.mark_static_address(table.values)
        elif table.values.shape[1] < length:
            if not self._growable:  # a static table keeps its address for compiled graphs
                raise RuntimeError(f"position {length - 1} is past the static cache "
                                   f"({table.values.shape[1]} positions)")
            table.grow(length)  # dynamic cache: grow, keeping the written values
        if table.values.shape[0] != rows:
            raise RuntimeError(f"cache batch changed from {table.values.shape[0]} to {rows} rows")
        self.multipliers = table
        return table

    _growable = True

    def _initial_capacity(self, length: int) -> int:
        return max(length, 256)


class SoftCFGCache(MultiplierCache, DynamicCache):
    """`DynamicCache` whose `update()` returns K/V scaled by the SoftCFG multiplier table.

    Every layer is a full-attention `DynamicLayer` (no config is read), so absolute
    positions index the table directly. `target`: "v" (default), "k" or "kv".
    `enabled=False` makes it behave exactly like `DynamicCache` (plain CFG).
    """

    def __init__(self, target: str = "v", enabled: bool = True) -> None:
        super().__init__()
        self._init_softcfg(target, enabled)


class SoftCFGStaticCache(MultiplierCache, StaticCache):
    """`StaticCache` (torch.compile friendly) with the same scaling as `SoftCFGCache`.

    The table has `max_cache_len` columns from the first forward on and is only ever
    written in place, so compiled decode steps do not recompile when multipliers change.
    Only full-attention layers are supported (sliding-window or linear-attention layers
    would need their own position bookkeeping); use `SoftCFGCache` for such models.
    """

    def __init__(self, config, max_cache_len: int, target: str = "v", enabled: bool = True,
                 **kwargs) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        unsupported = sorted({type(layer).__name__ for layer in self.layers
                              if type(layer) is not StaticLayer})
        if unsupported:
            raise NotImplementedError(f"SoftCFGStaticCache supports full-attention layers only; "
                                      f"this config builds {unsupported}. Use SoftCFGCache "
                                      f"instead.")
        self.max_cache_len = max_cache_len
        self._init_softcfg(target, enabled)

    _growable = False

    def _initial_capacity(self, length: int) -> int:
        return self.max_cache_len


def make_cache(model: torch.nn.Module, guidance: Guidance, cache_implementation: str = "dynamic",
               max_cache_len: Optional[int] = None) -> MultiplierCache:
    """A SoftCFG cache for `model`; scaling is switched off unless SoftCFG is on."""
    kwargs = dict(target=guidance.softcfg_target, enabled=runs_softcfg(guidance, model))
    if cache_implementation == "dynamic":
        return SoftCFGCache(**kwargs)
    if cache_implementation == "static":
        if max_cache_len is None:
            raise ValueError("a static cache needs max_cache_len")
        return SoftCFGStaticCache(model.config, max_cache_len, **kwargs)
    raise ValueError(f"cache_implementation must be 'dynamic' or 'static', "
                     f"got {cache_implementation!r}")
