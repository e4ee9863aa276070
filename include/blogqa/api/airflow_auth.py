"""Authorization of the plugin's routes through Airflow's auth-manager interface.

Airflow does not authenticate a plugin's FastAPI app (it is mounted with `app.mount()`, which
inherits none of the core API's dependencies), so the plugin checks every request itself:

1. the caller's JWT: `Authorization: Bearer <token>` (a script, from `POST /auth/token`), else
   the `_token` cookie the UI's login sets (the UI view in its iframe sends it);
2. the user it names, from the configured auth manager's `get_user_from_token`;
3. read access to the blogqa DAG: `is_authorized_dag(method="GET", details=DagDetails(id=...))`.

The auth-manager interface (`BaseAuthManager`: `get_user_from_token`, `is_authorized_dag`,
`COOKIE_NAME_JWT_TOKEN`, `DagDetails` from its models) is the part of Airflow its "Public
Interface" page names as public. The configured instance comes from
`airflow.api_fastapi.app.get_auth_manager`, the accessor Airflow's own auth-manager providers
(FAB, Keycloak) use from their middlewares; Airflow offers no other way to reach it. This module
is the only place those imports live, and they happen on the first request, so importing the
API never imports Airflow. The core API's internal security module (`get_user`,
`requires_access_dag`) is not used.

Whatever auth manager is configured decides: FAB roles, Keycloak, or the simple auth manager,
where in "all admins" mode Airflow's own root middleware gives every request an admin token.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import HTTPException, Request, status

log = logging.getLogger(__name__)

DAG_ID = "blogqa_pipeline"  # reading blogqa's data requires read access to this DAG


def request_token(request: Request, cookie_name: str) -> str | None:
    """The bearer token of the request, else its session cookie; None when neither."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(cookie_name) or None


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


async def require_dag_reader(request: Request) -> None:
    """Dependency of every plugin route but /health: an Airflow user allowed to read the
    blogqa DAG. 401 without credentials or with an expired token, 403 for an invalid token
    or a user without read access, 503 when no auth manager runs in this process (the app
    was mounted outside `airflow api-server`)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from jwt import ExpiredSignatureError, InvalidTokenError

    token = request_token(request, COOKIE_NAME_JWT_TOKEN)
    if not token:
        raise _unauthorized("Not authenticated: sign in to Airflow or send a bearer token")
    try:
        manager = get_auth_manager()
    except RuntimeError:
        log.error("no Airflow auth manager in this process (stage api, url %s)", request.url.path)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Airflow's auth manager is not initialised in this process: the plugin is served"
            " by `airflow api-server`",
        ) from None
    try:
        user = await manager.get_user_from_token(token)
    except ExpiredSignatureError:
        raise _unauthorized("token expired: sign in to Airflow again") from None
    except InvalidTokenError:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Invalid JWT token") from None
    # Auth managers answer from their own stores (FAB queries its database): off the loop,
    # as Airflow runs its own synchronous permission checks.
    allowed = await asyncio.to_thread(
        manager.is_authorized_dag, method="GET", details=DagDetails(id=DAG_ID), user=user
    )
    if not allowed:
        log.warning(
            "user %s may not read DAG %s (stage api, url %s)",
            user.get_name(),
            DAG_ID,
            request.url.path,
        )
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"read access to the DAG {DAG_ID} is required"
        )
