"""A bounded per-user fair queue: round robin over users, first in first out within a user."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Refused: the queue (or this user's part of it) is full."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class FairQueue(Generic[T]):
    """Items waiting per user, served round robin so one user's flood cannot starve the others."""

    def __init__(self, max_total: int, max_per_user: int) -> None:
        if max_total < 0 or max_per_user < 0:
            raise ValueError("queue bounds must not be negative")
        self.max_total = max_total
        self.max_per_user = max_per_user
        # The rotation: users with something waiting, least recently served first. A user served moves
        # to the back; a newcomer joins at the back, so emptying and pushing again cannot jump the line.
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()
        self._total = 0

    def push_all(self, user: str, items: Sequence[T]) -> None:
        """Queue all of `items` for `user`, or none of them (raise QueueFull) when either bound would be exceeded."""
        if not items:
            return
        waiting = self.waiting(user)
        if waiting + len(items) > self.max_per_user:
            raise QueueFull(f"too many requests waiting for this user: {waiting} waiting, {len(items)} more asked, "
                            f"at most {self.max_per_user}")  # fmt: skip
        if self._total + len(items) > self.max_total:
            raise QueueFull(f"the queue is full: {self._total} waiting, {len(items)} more asked, "
                            f"at most {self.max_total}")  # fmt: skip
        queue = self._queues.get(user)
        if queue is None:
            queue = self._queues[user] = deque()
        queue.extend(items)
        self._total += len(items)

    def pop(self, can_take: Callable[[T], bool]) -> tuple[str, T] | None:
        """Next item in round-robin order over users (starting after the user served last), FIFO within a user.

        Takes the first item of that user's queue for which can_take(item) is true; None if no user has a
        takeable item. A user passed over because nothing of theirs could be taken keeps their place ahead
        of those served since.
        """
        for user, queue in self._queues.items():
            for i, item in enumerate(queue):
                if can_take(item):
                    del queue[i]
                    self._total -= 1
                    if queue:
                        self._queues.move_to_end(user)
                    else:
                        del self._queues[user]
                    return user, item
        return None

    def remove(self, item: T) -> bool:
        """Take a cancelled item out of the queue (identity or equality match); True if it was there."""
        for user, queue in self._queues.items():
            for i, queued in enumerate(queue):
                if queued is item or queued == item:
                    del queue[i]
                    self._total -= 1
                    if not queue:
                        del self._queues[user]
                    return True
        return False

    def __len__(self) -> int:
        return self._total

    def waiting(self, user: str) -> int:
        """How many items `user` has waiting."""
        queue = self._queues.get(user)
        return 0 if queue is None else len(queue)

    def users(self) -> int:
        """How many users have something waiting."""
        return len(self._queues)
