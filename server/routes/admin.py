"""GET /admin: a small operator page (prefixes, live metrics, a box to try a prefix).

The page is static: it holds no secret and talks to the public API with the key the operator types in
(kept in the browser's localStorage), so serving it needs no auth. Everything is local: no CDN, no build step.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

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


@router.get("/admin", include_in_schema=False)
def admin_page() -> FileResponse:
    """The admin page."""
    return FileResponse(STATIC_DIR / "admin.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/admin/admin.js", include_in_schema=False)
def admin_script() -> FileResponse:
    return FileResponse(STATIC_DIR / "admin.js", media_type="text/javascript; charset=utf-8", headers=HEADERS)
