"""Replay (paper Section 4.1): SeqFT plus a memory buffer of a fixed fraction
(``--replay-fraction``) of each earlier task's training examples, mixed into later tasks'
training. Each task's buffer is drawn once with a seed of its own, so it is the same at
every later task and after a resume."""

from __future__ import annotations

import random
from dataclasses import dataclass

from nlora.data import Example, Task
from nlora.methods.base import register
from nlora.methods.seqft import SeqFT
from nlora.options import option


def buffer_size(config_fraction: float, n_train: int) -> int:
    """At least one example per earlier task, else round(fraction · n)."""
    return max(1, round(config_fraction * n_train))


def memory(task: Task, index: int, fraction: float, seed: int) -> list[Example]:
    """Task ``index``'s replay buffer."""
    rng = random.Random(seed * 1000 + index)
    return rng.sample(task.train, buffer_size(fraction, len(task.train)))


@dataclass
class ReplayOptions:
    replay_fraction: float = option(0.02, "replay: share of each earlier task's training set "
                                    "mixed into each later task", "float",
                                    "replay options", low=0, low_open=True, high=1)

@register
class Replay(SeqFT):
    name = "replay"
    title = "Replay"
    summary = "full fine-tuning with a share of every earlier task's training rows replayed"
    options = ReplayOptions

    def train_examples(self, index: int, tasks: list[Task]) -> list[Example]:
        replayed = [
            ex
            for i in range(index)
            for ex in memory(tasks[i], i, self.config.replay_fraction, self.config.seed)
        ]
        return tasks[index].train + replayed  # the loader shuffles them together
