"""The run's progress board, a Ray actor of its own: in a module that imports nothing, so that its worker
process starts with Ray alone (in ``tasks.actor`` it imported torch and the library: about 4 s of CPU and
300 MB per run for a dictionary)."""
from __future__ import annotations


class ProgressBoard:
    """How many images of each shard (or piece of a shard) the actors have explained (a Ray actor), told
    after every explain call of a batch as a fraction of its images.

    The driver reads the total whenever it likes: a report is a number, not a message to consume, so a slow
    driver misses nothing and the actors never wait. A shard's count only grows (a retried shard
    recomputes images it had already counted)."""

    def __init__(self) -> None:
        self.done: dict[int | tuple[int, int], float] = {}
        self.reports: list[tuple[int | tuple[int, int], float]] = []  # (shard, images), in arrival order

    def report(self, shard: int | tuple[int, int], images: float) -> None:
        self.reports.append((shard, images))
        self.done[shard] = max(images, self.done.get(shard, 0))

    def images(self) -> float:
        return sum(self.done.values())

    def history(self) -> list[tuple[int | tuple[int, int], float]]:
        return list(self.reports)
