"""The OpenAPI document is true to the app: the same routes and methods both ways, valid OpenAPI 3.1, served.

What the gateway answers on each route is checked against the document by tests/integration/test_api_fuzz.py.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from cdc_dashboard.config import Settings
from cdc_dashboard.gateway.app import create_app
from cdc_dashboard.gateway.openapi import document
from cdc_dashboard.gateway.page import STATIC_DIR

_OPERATIONS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def app() -> Starlette:
    # create_app connects to nothing until its lifespan runs, which these tests never start.
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, secret="s" * 40, database_url="postgresql://unused@127.0.0.1:1/unused"
    )
    return create_app(settings)


def _app_operations(app: Starlette) -> set[tuple[str, str]]:
    """(path, method) of every route; a mount counts as the one documented path under its prefix."""
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            # Starlette answers HEAD on every GET route by itself; OpenAPI documents GET (HEAD: same, no body).
            methods = (route.methods or set()) - {"HEAD"}
            found |= {(route.path, method.lower()) for method in methods}
        elif isinstance(route, Mount):
            found.add((f"{route.path}/{{mounted}}", "get"))
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return found


def _documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path, item in doc["paths"].items():
        # The static files are one templated path; the app mounts a directory there.
        path = re.sub(r"^/static/\{file\}$", "/static/{mounted}", path)
        found |= {(path, method) for method in item if method in _OPERATIONS}
    return found


def test_every_route_is_documented_and_every_documented_path_is_a_route(app: Starlette) -> None:
    routes, documented = _app_operations(app), _documented_operations(document())
    assert routes - documented == set(), "routes missing from the OpenAPI document (gateway/openapi.py)"
    assert documented - routes == set(), "the OpenAPI document describes routes the app does not have"


def test_the_static_files_documented_are_the_ones_served() -> None:
    (file,) = document()["paths"]["/static/{file}"]["get"]["parameters"]
    assert file["schema"]["enum"] == sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())


def test_path_parameters_match_the_route_templates() -> None:
    doc = document()
    components = doc["components"]["parameters"]
    for path, item in doc["paths"].items():
        declared: set[str] = set()
        for operation in [item, *(item[m] for m in item if m in _OPERATIONS)]:
            for parameter in operation.get("parameters", []):
                resolved = components[parameter["$ref"].rsplit("/", 1)[1]] if "$ref" in parameter else parameter
                if resolved["in"] == "path":
                    declared.add(resolved["name"])
        assert declared == set(re.findall(r"\{(\w+)\}", path)), path


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    # schemathesis validates against the OpenAPI 3.1 meta-schema (which leaves the JSON Schemas alone) ...
    schemathesis.openapi.from_dict(doc).validate()
    # ... so each schema is checked against JSON Schema 2020-12, the dialect 3.1 uses, too.
    for name, schema in doc["components"]["schemas"].items():
        meta = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        assert jsonschema_rs.meta.is_valid(meta), name
    # Every operation has a unique id (client generators name functions after them).
    ids = [op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m in _OPERATIONS]
    assert len(ids) == len(set(ids))


async def test_it_is_served_without_a_token(app: Starlette) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == document()
