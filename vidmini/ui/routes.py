"""HTTP routes the app adds beside Streamlit's own (mounted by `streamlit_app.py` through `st.App`).

Streamlit's own uploader keeps every uploaded file in memory (1.67 reads the whole body into an
`UploadedFileRec`), and `st.video(path)` loads the whole file into its media store: neither works for videos of
several GB. So uploads go to `PUT /vidmini/upload`, which streams the request body to disk piece by piece, and
the player reads `GET /vidmini/media/<video_id>`, served from the file with HTTP range requests (seeking); an
alert's clip is `GET /vidmini/clip/<watch>/<file>` (only files in that watch's clips folder, through the service).
All need the process's token (embedded in the page), so another site in the same browser cannot use them.
"""

from __future__ import annotations

import hmac
import mimetypes

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from vidmini.service.library import Library, LibraryError, shared_library
from vidmini.service.watch_view import clip_file

UPLOAD_PATH = "/vidmini/upload"
MEDIA_PATH = "/vidmini/media"
CLIP_PATH = "/vidmini/clip"
TOKEN_HEADER = "x-vidmini-token"


def _authorized(request: Request, library: Library) -> bool:
    token = request.headers.get(TOKEN_HEADER) or request.query_params.get("token", "")
    return bool(token) and hmac.compare_digest(token.encode(), library.upload_token.encode())


def upload_limit_bytes() -> int:
    """Streamlit's `server.maxUploadSize` (MB; .streamlit/config.toml raises it to 10 GB) applies here too."""
    from streamlit import config

    return int(config.get_option("server.maxUploadSize")) << 20


def make_routes(get_library=shared_library) -> list[Route]:
    """The upload and media routes over the Library `get_library()` returns."""

    async def upload(request: Request) -> Response:
        library = get_library()
        if not _authorized(request, library):
            return JSONResponse({"error": "not allowed: reload the page"}, status_code=403)
        name = request.query_params.get("name", "").strip() or "upload.mp4"
        try:
            dest, handle = library.open_upload(name)
        except (LibraryError, OSError) as e:
            return JSONResponse({"error": f"cannot store the upload: {e}"}, status_code=500)
        size, limit = 0, upload_limit_bytes()
        try:
            async for piece in request.stream():  # the body as it arrives: never all of it in memory
                size += len(piece)
                if size > limit:
                    library.abort_upload(dest, handle)
                    return JSONResponse({"error": f"{name} is larger than the upload limit ({limit >> 20} MB: "
                                                  "server.maxUploadSize)"}, status_code=413)
                handle.write(piece)
        except Exception as e:  # noqa: BLE001 - a dropped connection: nothing half-written stays
            library.abort_upload(dest, handle)
            return JSONResponse({"error": f"the upload of {name} broke off: {type(e).__name__}"}, status_code=400)
        library.finish_upload(dest, handle)
        if size == 0:
            dest.unlink(missing_ok=True)
            return JSONResponse({"error": f"{name} is empty (0 bytes): not a video"}, status_code=400)
        try:
            job = library.add(str(dest), name=name)
        except LibraryError as e:
            dest.unlink(missing_ok=True)
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"job_id": job.job_id, "name": job.name, "bytes": size})

    async def media(request: Request) -> Response:
        library = get_library()
        if not _authorized(request, library):
            return Response("not allowed", status_code=403)
        try:
            path = library.media_path(request.path_params["video_id"])
        except LibraryError as e:
            return Response(str(e), status_code=404)
        if path is None:
            return Response("the source file of this video is gone (or it was a stream)", status_code=404)
        kind = mimetypes.guess_type(path.name)[0] or "video/mp4"
        return FileResponse(path, media_type=kind)  # answers Range requests: the player can seek

    async def clip(request: Request) -> Response:
        library = get_library()
        if not _authorized(request, library):
            return Response("not allowed", status_code=403)
        path = clip_file(library, request.path_params["watch"], request.path_params["file"])
        if path is None:
            return Response("no such clip (removed by retention, or with its watch)", status_code=404)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "video/mp4")

    return [Route(UPLOAD_PATH, upload, methods=["PUT", "POST"]),
            Route(MEDIA_PATH + "/{video_id}", media, methods=["GET", "HEAD"]),
            Route(CLIP_PATH + "/{watch}/{file}", clip, methods=["GET", "HEAD"])]
