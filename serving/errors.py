"""Every error the gateway's API can answer with, in one catalogue, and its one shape on the wire.

An error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``
(``ErrorResponse``) with an HTTP status. ``ErrorCode`` lists every ``code``
with its status and a one-line meaning; the ``type`` follows from the status,
as OpenAI's do. Code anywhere in the gateway raises ``APIError(ErrorCode.X,
message)``; the HTTP layer (``serving.http.errors``) turns it into the
response. docs/api.md's error table is ``markdown_table()`` (a test holds the
two together; ``python -m serving.errors --update docs/api.md`` writes it).

Plain values: nothing here imports FastAPI or anything else of the gateway, so
the limits, the schema checks and the canary can raise without depending on
the HTTP layer.
"""

from __future__ import annotations

from enum import StrEnum, unique
from typing import Any

from pydantic import BaseModel

# OpenAI's error types, by status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    """OpenAI's ``type`` for an error of ``status``."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


@unique  # two members with one code would silently be one
class ErrorCode(StrEnum):
    """Every ``code`` the API answers with: its usual status and what it means (one line, for docs/api.md)."""

    status: int
    meaning: str

    def __new__(cls, code: str, status: int, meaning: str) -> ErrorCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status, member.meaning = status, meaning
        return member

    @property
    def type(self) -> str:
        return error_type(self.status)

    # The request itself.
    INVALID_JSON = "invalid_json", 400, "The body is not valid JSON."
    UNSUPPORTED_PARAMETER = "unsupported_parameter", 400, "A field outside the allowlist (named in `param`)."
    INVALID_FIELD = "invalid_field", 422, "A field of the wrong type or out of range (named in `param`)."
    MISSING_MODEL = "missing_model", 400, "No `model` and no default alias for the tenant."
    TOO_MANY_PROMPTS = "too_many_prompts", 400, "More prompts in one request than `LORAFLEET_MAX_PROMPTS`."
    TOO_MANY_SEQUENCES = "too_many_sequences", 400, "`n` × prompts above `LORAFLEET_MAX_SEQUENCES`."
    SEQUENCES_OVER_LIMIT = "sequences_over_limit", 400, "More sequences (n × prompts) than the tenant's limits allow."
    MAX_TOKENS_OVER_LIMIT = "max_tokens_over_limit", 400, "`max_tokens` above the tenant's limit."
    ANSWER_TOO_LARGE = "answer_too_large", 400, "A non-streamed answer over `LORAFLEET_MAX_ANSWER_ENTRIES`: stream it."
    SCHEMA_REFUSED = "schema_refused", 400, "A JSON Schema too large, too deep or not checkable in bounded time."
    INVALID_TOOLS = "invalid_tools", 400, "`tools` or `tool_choice` not in OpenAI's shape."
    TOOLS_UNSUPPORTED = "tools_unsupported", 400, "`tools` sent to an alias not trained on function calls."
    BODY_TOO_LARGE = "body_too_large", 413, "The body is over `LORAFLEET_MAX_BODY_BYTES` (uploads: the upload limit)."
    REQUEST_TIMEOUT = "request_timeout", 408, "The body took longer than `LORAFLEET_BODY_TIMEOUT_S` to arrive."
    UNKNOWN_ROUTE = "unknown_route", 404, "No such route."
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, "The route exists, not with this method."
    # Who is asking.
    INVALID_API_KEY = "invalid_api_key", 401, "A missing, wrong or revoked key, or a disabled tenant."
    INVALID_ADMIN_KEY = "invalid_admin_key", 401, "The admin API needs the admin key."
    ADMIN_DISABLED = "admin_disabled", 403, "The admin API is off: no admin key is configured."
    INVALID_METRICS_KEY = "invalid_metrics_key", 401, "`/metrics` needs the metrics key."
    # What is asked for.
    MODEL_NOT_FOUND = "model_not_found", 404, "An unknown alias, or one not granted to the caller (the same answer)."
    MODEL_TRAINING = "model_training", 503, "The alias's first version is still training (ETA in the message)."
    # Files (fine-tuning data).
    FILE_NOT_FOUND = "file_not_found", 404, "No such file, or not the caller's (the same answer)."
    INVALID_FILE = "invalid_file", 400, "An upload without its multipart `file` and `purpose`, or another purpose."
    FILE_QUOTA_EXCEEDED = "file_quota_exceeded", 429, "The tenant's files would pass `LORAFLEET_FILE_QUOTA_BYTES`."
    # Fine-tuning jobs.
    JOB_NOT_FOUND = "job_not_found", 404, "No such fine-tuning job, or not the caller's (the same answer)."
    INVALID_JOB = "invalid_job", 400, "A job field refused (named in `param`): model, files, suffix, method, metadata."
    JOB_QUOTA_EXCEEDED = "job_quota_exceeded", 429, "The tenant's waiting jobs are at its `queued_jobs` limit."
    JOB_STATE = "job_state", 400, "The job's status does not allow it (cancel a finished job, resume a running one)."
    MODEL_NOT_OWNED = "model_not_owned", 403, "Only a fine-tuned model of the caller's own can be deleted."
    # Limits.
    SCHEMA_CHECKS_BUSY = "schema_checks_busy", 429, "The tenant's earlier schemas are still being checked; retry."
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded", 429, "Over the tenant's requests per minute."
    TOKEN_RATE_LIMIT_EXCEEDED = "token_rate_limit_exceeded", 429, "Over the tenant's tokens per minute."
    CONCURRENCY_LIMIT_EXCEEDED = "concurrency_limit_exceeded", 429, "Over the tenant's concurrent requests."
    LIMITS_UNAVAILABLE = "limits_unavailable", 503, "The shared limits' Redis does not answer (fail-closed)."
    # The engines.
    ENGINE_STARTING = "engine_starting", 503, "No engine is ready yet."
    ENGINE_UNAVAILABLE = "engine_unavailable", 503, "The engine cannot be reached, is overloaded, or failed a load."
    ENGINE_TIMEOUT = "engine_timeout", 504, "The engine took longer than `LORAFLEET_UPSTREAM_TIMEOUT_S` to answer."
    ADAPTER_UNAVAILABLE = "adapter_unavailable", 503, "The alias's adapter cannot be served by any engine."
    ENGINE_REJECTED = "engine_rejected", 400, "vLLM refused the request (its 4xx status and message are kept)."
    ENGINE_ERROR = "engine_error", 502, "vLLM failed on the request (details in the log, never to the client)."
    ENGINE_STREAM_BROKEN = "engine_stream_broken", 502, "The engine broke off a stream: an error event in it."
    # The gateway and its state.
    STATE_UNAVAILABLE = "state_unavailable", 503, "The state database does not answer; nothing was written."
    INTERNAL_ERROR = "internal_error", 500, "A failure of the gateway itself (logged with the request id)."
    # The admin API.
    JSON_BODY_REQUIRED = "json_body_required", 400, "An admin write needs a JSON body (415: another content type)."
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type", 415, "A publish is a JSON path or a tar/zip archive."
    TENANT_NOT_FOUND = "tenant_not_found", 404, "No such tenant."
    TENANT_REFUSED = "tenant_refused", 400, "A tenant write refused (a bad name, a duplicate, an ungranted alias)."
    INVALID_ALIAS = "invalid_alias", 400, "Not a valid alias name."
    ALIAS_NOT_FOUND = "alias_not_found", 404, "No such alias in the adapter store."
    ADAPTER_NOT_FOUND = "adapter_not_found", 404, "No such version of the alias."
    ADAPTER_REFUSED = "adapter_refused", 400, "The store refused the adapter or the change (a misfit, no gate)."
    ARCHIVE_REFUSED = "archive_refused", 400, "An uploaded archive that is malformed or unsafe."
    OUTSIDE_IMPORT_ROOT = "outside_import_root", 400, "A publish path outside `LORAFLEET_IMPORT_ROOT`."
    NO_SUCH_PATH = "no_such_path", 400, "A publish path with no adapter directory."
    ALIAS_CHANGED = "alias_changed", 409, "Another writer moved the alias first; read it again and retry."
    CANARY_RUNNING = "canary_running", 409, "The alias has a canary under way; finish or abort it first."
    # Canaries.
    NO_CANARY = "no_canary", 404, "The alias has had no canary (or none active)."
    CANARY_EXISTS = "canary_exists", 409, "The alias has a running or paused canary already."
    CANARY_STATE = "canary_state", 409, "The canary is not in a state that allows this operation."
    NO_STABLE_VERSION = "no_stable_version", 400, "A canary needs a stable version to compare with."
    ALREADY_STABLE = "already_stable", 400, "The version is the stable one already."
    VERSION_RETIRED = "version_retired", 400, "The version is retired; publish it again to try it."
    GATE_REQUIRED = "gate_required", 400, "The version has no passing evaluation gate (or use `force`)."
    PROMOTE_REFUSED = "promote_refused", 400, "The store refused the promotion."


class ErrorInfo(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorInfo


class APIError(Exception):
    """An error the API answers with: ``code``'s status (or ``status``, for a code that passes one on), its
    message, the request field it is about (``param``) and any headers (``Retry-After``)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param
        self.status = status if status is not None else code.status
        self.headers = headers or {}


def error_body(status: int, message: str, code: ErrorCode | None = None, param: str | None = None) -> dict[str, Any]:
    """The wire body of an error (``ErrorResponse``, as a dict)."""
    info = ErrorInfo(message=message, type=error_type(status), param=param, code=code.value if code else None)
    return ErrorResponse(error=info).model_dump()


def markdown_table() -> str:
    """The catalogue as docs/api.md shows it."""
    rows = ["| code | status | type | meaning |", "|---|---|---|---|"]
    rows += [f"| `{c.value}` | {c.status} | `{c.type}` | {c.meaning} |" for c in ErrorCode]
    return "\n".join(rows) + "\n"


BEGIN, END = "<!-- error catalogue: generated from serving/errors.py -->\n", "<!-- end of the error catalogue -->"


def update_table(page: str) -> str:
    """``page`` (docs/api.md's text) with the table between its markers replaced by ``markdown_table()``."""
    start, end = page.index(BEGIN) + len(BEGIN), page.index(END)
    return page[:start] + markdown_table() + page[end:]


if __name__ == "__main__":  # python -m serving.errors [--update docs/api.md]
    import sys
    from pathlib import Path

    if sys.argv[1:2] == ["--update"]:
        doc = Path(sys.argv[2])
        doc.write_text(update_table(doc.read_text()))
    else:
        print(markdown_table(), end="")
