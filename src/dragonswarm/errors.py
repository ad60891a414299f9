"""Typed errors. Each knows its HTTP status and OpenAI error type/code.

They are translated to `{"error": {"message", "type", "code"}}` in one place
(`web.errors`), so code that raises never builds a response itself.
"""

from __future__ import annotations

from dragonswarm.protocol.events import Event, error_event


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, object]:
    """The OpenAI error shape, for typed errors and for the framework's own alike."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


class DragonError(Exception):
    """Base of every error the node reports to a client."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def event(self) -> Event:
        """This error as the `error` event that ends a generation's course."""
        return error_event(self.code, self.message, self.param)

    def to_dict(self) -> dict[str, object]:
        return error_body(self.message, self.type, self.code, self.param)


class InvalidRequest(DragonError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class UnsupportedParameter(InvalidRequest):
    """A field this server (or this model) cannot honour: refused, never silently ignored."""

    code = "unsupported_parameter"


class ModelNotFound(DragonError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(DragonError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class RetryLater(DragonError):
    """An error the client should retry after `retry_after` seconds (sent as Retry-After)."""

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(RetryLater):
    """The bounded queue is full."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class RateLimited(Overloaded):
    """This key used its requests or tokens for the minute."""

    code = "rate_limit_exceeded"


class Unauthorized(DragonError):
    """No key, or a key nobody issued."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(DragonError):
    """A valid key whose role does not allow this endpoint, or a request from a name or site refused."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class Timeout(DragonError):
    """A fragment passed its deadline: the request ends instead of hanging."""

    status = 504
    type = "server_error"
    code = "timeout"


class NoWorkers(DragonError):
    """The swarm has no live node that serves the model."""

    status = 503
    type = "server_error"
    code = "no_workers"


class NoCapacity(RetryLater):
    """A node handed over its owner's request, but no worker can take it right now: the
    node serves it itself instead of leaving its owner waiting in the swarm's queue."""

    status = 503
    type = "server_error"
    code = "no_capacity"


class InsufficientMemory(DragonError):
    """Loading the model would push the machine into swap."""

    status = 503
    type = "server_error"
    code = "insufficient_memory"


class RunnerFailed(DragonError):
    """The runner process died or could not start; the node itself is fine."""

    status = 503
    type = "server_error"
    code = "runner_failed"


class StoreUnavailable(RetryLater):
    """The shared store (Redis) did not answer: nothing was done, and a retry may succeed."""

    status = 503
    type = "server_error"
    code = "store_unavailable"


class ConfigError(Exception):
    """Bad command-line or configuration input: reported as one line, exit code 2."""
