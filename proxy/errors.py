"""The one exception the request path raises on purpose: a status and a short message, never values."""

from __future__ import annotations


class GatewayError(Exception):
    """A refusal or fault that becomes a JSON error response and an audit record.

    `message` is shown to the caller and written to the audit trail, so it names fields and routes
    but never holds a field value, a token or upstream body text.
    """

    def __init__(self, status: int, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or message
