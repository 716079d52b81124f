"""/files routes: parse, authorise, call the file service, shape the answer."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from tunehouse.api.auth import WEB_HEADER
from tunehouse.api.deps import CurrentCaller, FilesDep, SessionDep
from tunehouse.api.schemas import MultipartAbort, MultipartComplete, MultipartInitiate, file_object
from tunehouse.errors import InvalidInput
from tunehouse.downloads import serve_range
from tunehouse.files import MAX_PARTS, blob_key

router = APIRouter(prefix="/v1/files", tags=["files"])
# Type-level bounds only (a megabyte-long form field is not quoted back); the service checks the values.
Purpose = Annotated[str, Form(max_length=32)]
FileName = Annotated[str | None, Form(max_length=1024)]
FileType = Annotated[str | None, Form(max_length=16)]


def _public_base(request: Request) -> str:
    """TUNEHOUSE_PUBLIC_URL, else the address this connection reached (the socket's, as bound).
    Never the Host header: the client chooses it, and a forged one would send the bytes elsewhere."""
    settings = request.app.state.home.settings
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host, port = request.scope.get("server") or (settings.host, settings.port)  # None on a unix socket
    host = f"[{host}]" if ":" in host else host
    return f"{request.scope['scheme']}://{host}:{port}{request.scope.get('root_path', '')}".rstrip("/")


@router.post("", status_code=302)
def begin_upload(request: Request, caller: CurrentCaller, session: SessionDep, files: FilesDep,
                 purpose: Purpose = "fine-tune", file_name: FileName = None, file_type: FileType = None,
                 checksum: Annotated[str | None, Form(max_length=64)] = None,
                 file: UploadFile | None = File(None)):
    """Step 1 of the SDK upload: answer 302 with a signed, absolute PUT URL. A multipart body that
    carries the bytes as a `file` part (curl, the openai SDK, which sends no `file_name`: the part's
    own name is used) is stored in one go instead and answered 200 with the file object."""
    if file is not None:
        f = files.upload_oneshot(session, caller.owner, purpose=purpose,
                                 file_name=file_name or file.filename or "", file_type=file_type,
                                 chunks=_read_upload(file))
        return JSONResponse(file_object(f))  # 200: the route's declared status is the SDKs' 302
    if not file_name:
        raise InvalidInput("Send either `file_name` (the together SDKs' three-step upload) or the bytes as "
                           "a multipart `file` part.", param="file_name")
    f, token = files.begin(session, caller.owner, purpose=purpose, file_name=file_name,
                           file_type=file_type, checksum=checksum)
    web = request.headers.get(WEB_HEADER) == "1"
    # The dashboard's PUT stays on this origin: a browser PUT to the store would need CORS on the bucket.
    location = files.upload_url(f, token, _public_base(request), direct=not web)
    headers = {"Location": location, "X-Together-File-Id": f.id}
    if web:
        # The dashboard's fetch() cannot read a 302's Location (an opaque redirect): it gets the
        # same headers on a 200, the 2xx form the v3 SDK also accepts (api-reference §4.2).
        return JSONResponse({"id": f.id, "upload_url": location}, headers=headers)
    return Response(status_code=302, headers=headers)


@router.put("/{file_id}/bytes")
async def put_bytes(file_id: str, token: str, request: Request, files: FilesDep):
    """Step 2: the unauthenticated PUT of the raw bytes; the token in the URL is the authority.
    Both SDKs need exactly 200. Async to stream the body; the service keeps disk and database
    work off the event loop."""
    length = request.headers.get("content-length")
    await files.receive(file_id, token, request.stream(), int(length) if length else None)
    return JSONResponse({"id": file_id, "object": "file", "status": "uploaded"}, status_code=200)


@router.post("/{file_id}/preprocess")
def preprocess(file_id: str, caller: CurrentCaller, session: SessionDep, files: FilesDep):
    return file_object(files.preprocess(session, caller.owner, file_id))


@router.post("/upload")
def upload_oneshot(caller: CurrentCaller, session: SessionDep, files: FilesDep, file: UploadFile,
                   purpose: Purpose = "fine-tune", file_name: FileName = None, file_type: FileType = None):
    f = files.upload_oneshot(session, caller.owner, purpose=purpose,
                             file_name=file_name or file.filename or "", file_type=file_type,
                             chunks=_read_upload(file))
    return file_object(f)


@router.get("")
def list_files(caller: CurrentCaller, session: SessionDep, files: FilesDep, purpose: str | None = None,
               after: str | None = None, limit: int | None = Query(None, ge=1, le=10000),
               order: Literal["asc", "desc"] = "asc"):
    """The together SDKs send no query; the openai SDK may page with `after`/`limit`/`order` and
    filter by `purpose`, and stops paging on `has_more: false`."""
    page, more = files.list(session, caller.owner, purpose=purpose, after=after, limit=limit, order=order)
    return {"object": "list", "data": [file_object(f) for f in page], "has_more": more}


@router.get("/{file_id}")
def retrieve(file_id: str, caller: CurrentCaller, session: SessionDep, files: FilesDep):
    return file_object(files.get(session, caller.owner, file_id))


@router.get("/{file_id}/content")
def content(file_id: str, request: Request, caller: CurrentCaller, session: SessionDep, files: FilesDep):
    """Streamed from the store, Range honoured (downloads.py says why not a presigned redirect)."""
    f = files.get(session, caller.owner, file_id)
    return serve_range(files.home.blobs, blob_key(f), request.headers.get("range"), f.filename)


@router.delete("/{file_id}")
def delete(file_id: str, caller: CurrentCaller, session: SessionDep, files: FilesDep):
    files.delete(session, caller.owner, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# -- multipart flow for files over 5 GiB (api-reference §4.2) ----------------------------------
@router.post("/multipart/initiate")
def multipart_initiate(body: MultipartInitiate, request: Request, caller: CurrentCaller, session: SessionDep,
                       files: FilesDep):
    f, tokens = files.initiate_multipart(session, caller.owner, **body.model_dump())
    base = _public_base(request)
    parts = [{"PartNumber": n, "URL": files.part_url(f, n, t, base), "Headers": {}}
             for n, t in enumerate(tokens, start=1)]
    return {"upload_id": f.multipart["upload_id"], "file_id": f.id, "parts": parts}


@router.put("/{file_id}/parts/{part}")
async def multipart_put(file_id: str, part: Annotated[int, Path(ge=1, le=MAX_PARTS)], token: str, request: Request,
                        files: FilesDep):
    etag = await files.receive_part(file_id, part, token, request.stream())
    return Response(status_code=200, headers={"ETag": f'"{etag}"'})


@router.post("/multipart/complete")
def multipart_complete(body: MultipartComplete, caller: CurrentCaller, session: SessionDep, files: FilesDep):
    f = files.complete_multipart(session, caller.owner, upload_id=body.upload_id, file_id=body.file_id,
                                 parts=[(p.part_number, p.etag) for p in body.parts])
    return file_object(f)


@router.post("/multipart/abort")
def multipart_abort(body: MultipartAbort, caller: CurrentCaller, session: SessionDep, files: FilesDep):
    files.abort_multipart(session, caller.owner, upload_id=body.upload_id, file_id=body.file_id)
    return {"upload_id": body.upload_id, "file_id": body.file_id, "aborted": True}


def _read_upload(file: UploadFile):
    """The form part's bytes; the routes that read it are sync (run in the thread pool), so the
    upload's disk writes, hashing and validation never block the event loop."""
    if file is None:
        raise InvalidInput("Attach the dataset as the `file` part.", param="file")
    while chunk := file.file.read(1 << 20):
        yield chunk
