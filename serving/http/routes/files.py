"""OpenAI's files API, scoped by the tenant key: the data a tenant fine-tunes on.

POST   /v1/files                 multipart: ``file`` and ``purpose`` ("fine-tune"); streams to disk
GET    /v1/files                 ``after``, ``limit`` (1-10,000), ``order`` (asc, desc), ``purpose``
GET    /v1/files/{id}            the FileObject
GET    /v1/files/{id}/content    the bytes as uploaded
DELETE /v1/files/{id}            ``{"id", "object": "file", "deleted": true}``

The tenant's key is checked before a byte of an upload is read; the body is
counted and timed as it arrives (``serving.http.middleware``), parsed a part
at a time (``python-multipart`` spools a file part to disk), and copied into
the store while it is hashed (``serving.state.files``). Another tenant's file
is a 404 exactly like a missing one.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from serving.errors import APIError, ErrorCode
from serving.http.deps import StateDep, TenantDep
from serving.http.protocol import cursor_page
from serving.state.files import FileError, FileNotFound, FileTooLarge, QuotaExceeded, chunks

FILES_PATH = "/v1/files"  # its POST body streams through (serving.http.middleware)
router = APIRouter(prefix=FILES_PATH)


def _refused(exc: FileError) -> APIError:
    if isinstance(exc, FileNotFound):
        return APIError(ErrorCode.FILE_NOT_FOUND, str(exc), param="file_id")
    if isinstance(exc, FileTooLarge):
        return APIError(ErrorCode.BODY_TOO_LARGE, str(exc), param="file")
    if isinstance(exc, QuotaExceeded):
        # Not for the openai client to send again on its own (it retries 429s): only deleting files helps.
        return APIError(ErrorCode.FILE_QUOTA_EXCEEDED, str(exc), param="file", headers={"x-should-retry": "false"})
    return APIError(ErrorCode.INVALID_FILE, str(exc), param="purpose")


@router.post("", response_model=None)
async def create_file(request: Request, tenant: TenantDep, state: StateDep) -> dict[str, Any] | Response:
    """Upload a file (multipart ``file`` and ``purpose``)."""
    files = state.files
    declared = request.headers.get("content-length")
    try:
        await asyncio.to_thread(files.admit, tenant.id, int(declared) if declared and declared.isdigit() else None)
    except FileError as exc:
        raise _refused(exc) from exc
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise APIError(
            ErrorCode.INVALID_FILE, "Send multipart/form-data with a 'file' part and a 'purpose' field.", param="file"
        )
    try:
        form = await request.form(max_files=1, max_fields=4)
    except ClientDisconnect:  # the upload was cut off: nothing was stored (the parser removed what had come)
        return Response(status_code=499)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(ErrorCode.INVALID_FILE, "The upload has no 'file' part.", param="file")
        if not isinstance(purpose, str):
            raise APIError(
                ErrorCode.INVALID_FILE, "The upload has no 'purpose' field (use fine-tune).", param="purpose"
            )
        try:
            record = await asyncio.to_thread(files.add, tenant.id, upload.filename or "", purpose, upload.file)
        except FileError as exc:
            raise _refused(exc) from exc
    finally:
        await form.close()  # the spooled part's temporary file goes
    return record.as_openai()


@router.get("")
async def list_files(
    tenant: TenantDep,
    state: StateDep,
    after: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=10_000, ge=1, le=10_000),
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = Query(default=None, max_length=32),
) -> dict[str, Any]:
    """The tenant's files, newest first by default (a cursor page)."""
    try:
        page, more = await asyncio.to_thread(
            state.files.page, tenant.id, after=after, limit=limit, order=order, purpose=purpose
        )
    except FileError as exc:
        raise _refused(exc) from exc
    data = [record.as_openai() for record in page]
    return cursor_page(data, more)


@router.get("/{file_id}")
async def retrieve_file(file_id: str, tenant: TenantDep, state: StateDep) -> dict[str, Any]:
    """One file's FileObject."""
    try:
        return (await asyncio.to_thread(state.files.get, tenant.id, file_id)).as_openai()
    except FileError as exc:
        raise _refused(exc) from exc


@router.get("/{file_id}/content", response_model=None)
async def file_content(file_id: str, tenant: TenantDep, state: StateDep) -> StreamingResponse:
    """The file's bytes, as uploaded."""
    files = state.files
    try:
        record = await asyncio.to_thread(files.get, tenant.id, file_id)
        source = await asyncio.to_thread(files.open, record)  # opened before the 200 goes out
    except FileError as exc:
        raise _refused(exc) from exc
    headers = {"content-length": str(record.bytes), "x-lorafleet-sha256": record.sha256}
    return StreamingResponse(chunks(source), media_type="application/octet-stream", headers=headers)


@router.delete("/{file_id}")
async def delete_file(file_id: str, tenant: TenantDep, state: StateDep) -> dict[str, Any]:
    """Delete a file (its bytes and its record)."""
    try:
        await asyncio.to_thread(state.files.delete, tenant.id, file_id)
    except FileError as exc:
        raise _refused(exc) from exc
    return {"id": file_id, "object": "file", "deleted": True}
