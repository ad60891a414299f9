"""A bounded per-user fair queue: round robin over users, first in first out within a user.

Admission is fair too. A fixed bound per user let a few flooding users fill the whole queue
and turn every other user away. Here a user's bound shrinks as more users wait, and users
already waiting must leave room free for one more user's share, so a user with nothing
waiting always finds room: however many items the users already waiting push, they can
never take the room a newcomer needs. (Only newcomers use that room; if many arrive at once
while the queue is nearly full, the last may still wait until work drains it.)
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Refused: the queue (or this user's part of it) is full."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def fair_share(max_total: int, max_per_user: int, users: int) -> int:
    """The most items one user may hold while `users` users (counting it) have something waiting."""
    return max(1, min(max_per_user, max_total // max(1, users)))


def admission_room(held: int, total: int, users: int, max_total: int, max_per_user: int) -> tuple[int, int]:
    """How many more items a user holding `held` may queue: (by its own share, by the room in the queue).

    `users` counts the users waiting after the push, this one included. A user already waiting
    must leave one more user's fair share free; a newcomer (held == 0) may use that room.
    """
    own = fair_share(max_total, max_per_user, users) - held
    reserve = fair_share(max_total, max_per_user, users + 1) if held else 0
    return max(0, own), max(0, max_total - reserve - total)


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
        # What other replicas of the swarm hold waiting, per user, as they last published it:
        # admission counts the whole swarm's queue, so a user cannot take a full share on each.
        self.elsewhere: dict[str, int] = {}

    def push_all(self, user: str, items: Sequence[T]) -> None:
        """Queue all of `items` for `user`, or none of them (raise QueueFull) when they exceed `room(user)`."""
        if not items:
            return
        waiting, users, total = self._held(user), self._users_with(user), self._total_everywhere()
        own, free = admission_room(waiting, total, users, self.max_total, self.max_per_user)
        if len(items) > own:
            share = fair_share(self.max_total, self.max_per_user, users)
            raise QueueFull(f"too many requests waiting for this user: {waiting} waiting, {len(items)} more asked, "
                            f"at most {share} while {users} users share the queue")  # fmt: skip
        if len(items) > free:
            held = " (room is kept for users with nothing waiting)" if waiting else ""
            raise QueueFull(f"the queue is full: {total} waiting, {len(items)} more asked, "
                            f"at most {self.max_total}{held}")  # fmt: skip
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

    def __iter__(self) -> Iterator[T]:
        """Every item waiting, user by user."""
        for queue in self._queues.values():
            yield from queue

    def waiting(self, user: str) -> int:
        """How many items `user` has waiting."""
        queue = self._queues.get(user)
        return 0 if queue is None else len(queue)

    def room(self, user: str) -> int:
        """How many more items `user` may queue now."""
        return min(admission_room(self._held(user), self._total_everywhere(), self._users_with(user), self.max_total,
                                  self.max_per_user))  # fmt: skip

    def _held(self, user: str) -> int:
        return self.waiting(user) + self.elsewhere.get(user, 0)

    def _total_everywhere(self) -> int:
        return self._total + sum(self.elsewhere.values())

    def _users_with(self, user: str) -> int:
        """How many users would be waiting, here or elsewhere, once `user` has something queued."""
        waiting = set(self._queues) | {u for u, n in self.elsewhere.items() if n}
        return len(waiting) + (user not in waiting)

    def by_user(self) -> dict[str, int]:
        """How many items each user has waiting here."""
        return {user: len(queue) for user, queue in self._queues.items()}

    def users(self) -> int:
        """How many users have something waiting."""
        return len(self._queues)
