"""The order of timed rounds, shared by the benchmarks.

Every benchmark here times several programs in rounds, each round running
every program once, and reports medians over rounds: load from other
processes then falls on all of them alike. The order within a round is
shuffled anew each round (seeded, so runs repeat): on this CPU a program ran
up to 14% slower after some programs than after others (the memory the last
one freed is mapped again), and a fixed or rotated order gives each program
nearly always the same predecessor.
"""

from __future__ import annotations

import random
from typing import Hashable, Iterator, Sequence


def orders(keys: Sequence[Hashable], rounds: int,
           seed: int = 0) -> Iterator[list]:
  """Yields ``rounds`` orderings of ``keys``, each a fresh shuffle.

  >>> [sorted(order) for order in orders("abc", 2)]
  [['a', 'b', 'c'], ['a', 'b', 'c']]
  """
  rng = random.Random(seed)
  for _ in range(rounds):
    order = list(keys)
    rng.shuffle(order)
    yield order
