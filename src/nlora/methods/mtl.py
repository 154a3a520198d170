"""MTL, the upper bound (paper Section 4.1): one LoRA adapter trained once on every task's
training data mixed, then every task is evaluated once (the accuracy matrix has a single
column; F.Ra and BWT are undefined). Per-task options (lr, epochs) take the first value."""

from __future__ import annotations

from nlora.data import Example, Task
from nlora.methods.base import register
from nlora.methods.inclora import IncLoRA


@register
class MTL(IncLoRA):
    name = "mtl"
    title = "MTL"
    summary = "one LoRA adapter trained once on every task mixed (the upper bound)"
    exact_sparsity = False
    joint = True

    def train_examples(self, index: int, tasks: list[Task]) -> list[Example]:
        # the loader shuffles, so the tasks are mixed within every epoch
        return [example for task in tasks for example in task.train]
