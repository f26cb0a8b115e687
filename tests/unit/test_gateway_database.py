"""Which errors the gateway answers with 503 (the database is away) rather than 500 (a bug)."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cdc_dashboard.config import Settings
from cdc_dashboard.gateway.app import create_app
from cdc_dashboard.gateway.database import is_unavailable

exc = asyncpg.exceptions


@pytest.mark.parametrize(
    "error",
    [
        exc.ConnectionFailureError("08006"),
        exc.ClientCannotConnectError("08001"),
        exc.AdminShutdownError("57P01"),
        exc.CrashShutdownError("57P02"),
        exc.CannotConnectNowError("57P03"),
        exc.QueryCanceledError("57014"),
        exc.TooManyConnectionsError("53300"),
        exc.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(),
        OSError("Network is unreachable"),
        TimeoutError(),
    ],
    ids=type,
)
def test_the_database_away_is_unavailable(error: BaseException) -> None:
    assert is_unavailable(error)


@pytest.mark.parametrize(
    "error",
    [
        exc.UniqueViolationError("23505"),
        exc.UndefinedTableError("42P01"),
        exc.DiskFullError("53100"),
        asyncpg.DataError("invalid input for query argument $1"),
        asyncpg.InterfaceError("the server expects 2 arguments for this query, 1 was passed"),
        ValueError("bad"),
    ],
    ids=type,
)
def test_bugs_and_bad_requests_are_not(error: BaseException) -> None:
    assert not is_unavailable(error)


def _app_raising(error: Exception) -> Starlette:
    """The real app (its exception handlers), with one more route that raises `error`; no lifespan runs."""

    async def boom(request: Request) -> Response:
        raise error

    settings = Settings(_env_file=None, database_url="postgresql://nobody@127.0.0.1:1/none", secret="s" * 32)  # type: ignore[call-arg]
    app = create_app(settings)
    app.router.routes.append(Route("/boom", boom))
    return app


async def _get_boom(error: Exception) -> httpx.Response:
    transport = httpx.ASGITransport(app=_app_raising(error), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.get("/boom")


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(111, "Connect call failed"), TimeoutError(), exc.AdminShutdownError("57P01")],
    ids=type,
)
async def test_a_connection_class_error_anywhere_is_a_503_with_retry_after(error: Exception) -> None:
    response = await _get_boom(error)
    assert response.status_code == 503
    assert 1 <= int(response.headers["Retry-After"]) <= 10
    assert response.json() == {"error": "the database is unavailable; retry later"}


@pytest.mark.parametrize(
    "error", [exc.UndefinedTableError("42P01"), asyncpg.DataError("bad argument"), FileNotFoundError()], ids=type
)
async def test_a_bug_of_the_same_classes_is_still_a_500(error: Exception) -> None:
    response = await _get_boom(error)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error"}
