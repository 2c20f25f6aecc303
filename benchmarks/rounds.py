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
import statistics
import time
from typing import Hashable, Iterator, Mapping, Sequence

import jax


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


def time_once(fn, *args) -> float:
  """Seconds of one call ``fn(*args)``, until its results are ready."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def median_times(runners: Mapping[Hashable, tuple], rounds: int,
                 seed: int = 0) -> dict:
  """Median seconds per call of each ``runners[key] = (fn, args)``, timed
  once per round in the :func:`orders` of ``rounds`` rounds. No warm-up:
  call each program once before.

  >>> sorted(median_times({"a": (abs, (-1,)), "b": (abs, (2,))}, 3))
  ['a', 'b']
  """
  times = {key: [] for key in runners}
  for order in orders(list(runners), rounds, seed):
    for key in order:
      fn, args = runners[key]
      times[key].append(time_once(fn, *args))
  return {key: statistics.median(t) for key, t in times.items()}
