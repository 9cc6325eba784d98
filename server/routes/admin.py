"""GET /admin: a small operator page (prefixes, live metrics, a box to try a prefix).

The page is static: it holds no secret and talks to the public API with the key the operator types in
(kept in the browser's localStorage), so serving it needs no auth. Everything is local: no CDN, no build step.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.errors import ServiceError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Scripts only from this origin (no inline script, no eval); the page may call only this origin.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["admin"])


def _static(name: str, media_type: str) -> FileResponse:
    path = STATIC_DIR / name
    if not path.is_file():  # an install that left out the package data
        raise ServiceError(
            404,
            "admin_page_missing",
            f"{path} is not installed; reinstall prefixserve with its server/static files",
        )
    return FileResponse(path, media_type=media_type, headers=HEADERS)


@router.get("/admin", include_in_schema=False)
def admin_page() -> FileResponse:
    """The admin page."""
    return _static("admin.html", "text/html; charset=utf-8")


@router.get("/admin/admin.js", include_in_schema=False)
def admin_script() -> FileResponse:
    return _static("admin.js", "text/javascript; charset=utf-8")
