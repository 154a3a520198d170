"""LoRA dropout whose masks depend on the data row, not on the process that runs it.

``torch.nn.Dropout`` draws from one random stream per process, so the mask a row receives
changes with how rows are spread over processes and micro-batches, and with them the result.
Here each row's mask comes from a generator of its own, seeded from (run seed, epoch, row,
module), so a run draws the same masks on any number of processes and with any
``--grad-accum``. The distribution is torch's: keep with probability 1 - p, scale by 1/(1 - p).

Only the adapters' dropout (PEFT's ``lora_dropout``) is replaced, and only while a task
trains; a base model's own dropout (T5 has some; LLaMA-family models have none) still draws
per process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from peft.tuners.lora import LoraLayer

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (deterministic on every machine)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


class RowKeys:
    """The rows of the forward pass about to run, as the training loop announces them.

    ``keys``: one integer per row of the batch (None: plain dropout). ``length``: the longest
    sequence of the task; every row's mask is drawn at this length and cut to the batch's,
    so padding never changes the numbers a row receives.
    """

    def __init__(self, length: int = 0) -> None:
        self.keys: Sequence[int] | None = None
        self.length = length


class RowKeyedDropout(torch.nn.Module):
    def __init__(self, p: float, ordinal: int, rows: RowKeys) -> None:
        super().__init__()
        self.p = p
        self.ordinal = ordinal
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keys = self.rows.keys
        if keys is None or x.dim() < 2 or len(keys) != x.shape[0]:
            # plain dropout here would make the result depend on the process count again
            raise RuntimeError(
                f"row-keyed LoRA dropout #{self.ordinal} got a batch of shape "
                f"{tuple(x.shape)} but the training loop announced "
                f"{'no rows' if keys is None else f'{len(keys)} rows'}: a forward pass in "
                "training mode outside the loop's micro-batches"
            )
        length = max(self.rows.length, x.shape[1])
        masks = []
        for key in keys:
            gen = torch.Generator(device=x.device).manual_seed(mix(key, self.ordinal))
            draw = torch.rand((length, *x.shape[2:]), generator=gen, device=x.device)
            masks.append(draw[: x.shape[1]] >= self.p)
        keep = torch.stack(masks).to(x.dtype)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, row-keyed"


def use_row_keyed_dropout(model: torch.nn.Module, rows: RowKeys) -> Callable[[], None]:
    """Swap every LoRA dropout of ``model`` for a row-keyed one; return the undo function."""
    swapped = []
    ordinal = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                module.lora_dropout[name] = RowKeyedDropout(dropout.p, ordinal, rows)
                swapped.append((module.lora_dropout, name, dropout))
            elif not isinstance(dropout, torch.nn.Dropout | torch.nn.Identity):
                raise RuntimeError(  # an unknown kind would draw per process, unannounced
                    f"LoRA dropout of {type(module).__name__} is a "
                    f"{type(dropout).__name__}, which nlora cannot key by row"
                )
            ordinal += 1

    def undo() -> None:
        for holder, name, original in swapped:
            holder[name] = original

    return undo
