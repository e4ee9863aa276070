"""/quality/: the quality gate's Data Docs (static HTML built under $BLOGQA_HOME/quality by
the validate_tables task or `blogqa quality --docs`), behind the API's own credentials: the
pages show document URLs and the values that failed."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, RedirectResponse

from blogqa.config import Settings, load_settings

NO_DOCS = (
    "no Data Docs here yet: the validate_tables task builds them after a run where it runs, "
    "`blogqa quality --docs` where this API runs"
)


def router(settings: Settings | None = None) -> APIRouter:
    """Routes serving the Data Docs folder of `settings` (read from the environment when
    None): files only, never outside the folder."""
    from blogqa.quality import docs_dir

    root = docs_dir(settings or load_settings())
    routes = APIRouter(include_in_schema=False)

    @routes.get("/quality")
    async def quality_root() -> RedirectResponse:
        return RedirectResponse("quality/", status_code=status.HTTP_307_TEMPORARY_REDIRECT)

    @routes.get("/quality/{path:path}")
    async def quality_file(path: str) -> FileResponse:
        base = root.resolve()
        target = (base / path).resolve() if path else base
        if target.is_dir():
            target = target / "index.html"
        if not _inside(target, base) or not target.is_file():
            raise HTTPException(status.HTTP_404_NOT_FOUND, NO_DOCS if not path else "not found")
        return FileResponse(target)

    return routes


def _inside(path: Path, base: Path) -> bool:
    return path == base or base in path.parents
