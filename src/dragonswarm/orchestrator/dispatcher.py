"""Waiting fragments and the workers that take them: the fair queue, the fragments moving
after a failure (they go first), and the choice of a worker for each.

The choices are the scheduler's (cache affinity, the placement index); this module only
asks them in the right order and hands each placed fragment to `start`.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable

from dragonswarm.errors import Overloaded
from dragonswarm.orchestrator.fragments import Fragment
from dragonswarm.orchestrator.registry import NodeConn, Registry, model_key
from dragonswarm.scheduler.affinity import CacheAffinity
from dragonswarm.scheduler.fairqueue import FairQueue, QueueFull


class Dispatcher:
    def __init__(self, registry: Registry, queue: FairQueue[Fragment], start: Callable[[Fragment, NodeConn], None]):
        self.registry = registry
        self.queue = queue
        self.retries: deque[Fragment] = deque()  # fragments moving after a failure go first
        self.affinity = CacheAffinity()
        self.start = start  # runs a placed fragment on its node

    def queue_all(self, user: str, fragments: list[Fragment]) -> None:
        try:
            self.queue.push_all(user, fragments)
        except QueueFull as exc:
            raise Overloaded(exc.message, retry_after=exc.retry_after) from None
        self.dispatch()

    def retry(self, f: Fragment) -> None:
        self.retries.append(f)
        self.dispatch()

    def withdraw(self, f: Fragment) -> None:
        """A waiting fragment ended (its request did): it no longer waits anywhere."""
        self.queue.remove(f)
        with contextlib.suppress(ValueError):
            self.retries.remove(f)

    def free_now(self, f: Fragment) -> bool:
        """Some worker could take this fragment right now."""
        return self.choose(f, set()) is not None

    def dispatch(self) -> None:
        """Place every waiting fragment that some worker can take now."""
        full: set[str] = set()  # models with no free node in this pass: skip their fragments fast
        for f in list(self.retries):  # moved fragments first, any that fit (not only the head)
            if self._place(f, full):
                self.retries.remove(f)
        while (item := self.queue.pop(lambda f: self.choose(f, full) is not None)) is not None:
            self._place(item[1], full)

    def _exclude(self, f: Fragment, key: str) -> set[str]:
        if not f.exclude and not f.min_ctx:
            return f.exclude
        serving = self.registry.serving_file(key)
        # A worker whose context cannot hold prompt and answer is never asked.
        small = {c.name for c in serving if 0 < c.n_ctx.get(key, 0) < f.min_ctx}
        # The rest is a preference: if every node that serves the model is excluded (say
        # the only worker failed once), trying one of them again beats failing.
        if {c.name for c in serving} - small - f.exclude:
            return f.exclude | small
        return small

    def choose(self, f: Fragment, full: set[str]) -> tuple[str, str] | None:
        """(node, model file) for the fragment: the node whose cache holds the longest prefix
        of its prompt if that node is free, else the placement index's best. Once a request
        has a model file, every fragment of it stays on that file."""
        req = f.request
        index = self.registry.index
        for sha in [req.sha256] if req.sha256 else self.registry.files(req.model):
            key = model_key(req.model, sha)
            if key in full:
                continue
            exclude = self._exclude(f, key)
            for holder in self.affinity.holders(key, f.keys):
                state = index.get(holder)
                # Only a warm runner still holds its cache: a reloaded model starts empty.
                if holder not in exclude and index.eligible(key, holder) and state and key in state.loaded:
                    return holder, sha
            name = index.choose(key, exclude)
            if name is not None:
                return name, sha
            if not exclude:
                full.add(key)  # nobody at all can take this model file now
        return None

    def _place(self, f: Fragment, full: set[str]) -> bool:
        chosen = self.choose(f, full)
        if chosen is None:
            return False
        name, sha = chosen
        f.request.sha256 = sha
        self.affinity.record(name, model_key(f.request.model, sha), f.keys)
        self.start(f, self.registry.conns[name])
        return True

    def status(self) -> dict[str, int]:
        return {"queued": len(self.queue), "retrying": len(self.retries), "users_waiting": self.queue.users(),
                "queued_elsewhere": sum(self.queue.elsewhere.values())}  # on other replicas, as they last said
