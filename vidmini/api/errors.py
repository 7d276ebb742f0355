"""Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the status that says why;
every route of the HTTP face raises `ApiError` and the guard around it answers with `response()`."""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.retry_after = retry_after if retry_after is not None else (2.0 if status in (429, 503) else None)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else None
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def not_found(message: str, code: str = "video_not_found") -> ApiError:
    return ApiError(404, message, code=code)
