"""The one error type of the server: an HTTP status, the request field it is about, and a message."""

from __future__ import annotations

from typing import Optional


class RequestError(Exception):
    """Answered as JSON {"error": <kind>, "field": <field>, "detail": <message>} with `status`."""

    KINDS = {400: "OverLimit", 401: "Unauthorized", 422: "InvalidField", 500: "GenerationFailed",
             503: "QueueFull"}

    def __init__(self, status: int, detail: str, field: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.detail, self.field, self.headers = status, detail, field, headers or {}

    def body(self) -> dict:
        return {"error": self.KINDS.get(self.status, "Error"), "field": self.field, "detail": self.detail}
