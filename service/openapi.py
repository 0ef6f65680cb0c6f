"""The OpenAPI schema, made to say exactly what the service accepts (FastAPI's says a little more).

- A parameter FastAPI writes as "X or null" (an optional one) is X: a query or a header cannot be null.
- The image forms' ``file`` arrays hold at most ``ALEXNET_MAX_FILES`` items (a setting: written in here).
- FastAPI adds a 422 HTTPValidationError answer to every operation with parameters. Where that answer is
  documented at all it is a Problem (problems.py), or under /v2 a 400 ``{"error"}``: the 422s still of
  FastAPI's form cannot happen, and go, with their schemas.
"""

from __future__ import annotations

from fastapi import FastAPI

VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"


def install(app: FastAPI, max_files: int) -> None:
    generate = app.openapi

    def openapi() -> dict:
        return exact(generate(), max_files)

    app.openapi = openapi


def exact(schema: dict, max_files: int) -> dict:
    """``schema`` with the corrections above (in place; applying them again changes nothing)."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            files = form.get("schema", {}).get("properties", {}).get("file", {})
            if files.get("type") == "array":
                files["maxItems"] = max_files
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _not_null(parameter["schema"])
            responses = operation.get("responses", {})
            body = responses.get("422", {}).get("content", {}).get("application/json", {})
            if body.get("schema", {}).get("$ref") == VALIDATION_ERROR:
                del responses["422"]
    schemas = schema.get("components", {}).get("schemas", {})
    if VALIDATION_ERROR.rsplit("/", 1)[-1] in schemas and VALIDATION_ERROR not in str(schema.get("paths")):
        schemas.pop("HTTPValidationError")
        schemas.pop("ValidationError", None)
    return schema


def _not_null(schema: dict) -> dict:
    alternatives = schema.get("anyOf")
    if not alternatives or {"type": "null"} not in alternatives:
        return schema
    rest = [a for a in alternatives if a != {"type": "null"}]
    outer = {k: v for k, v in schema.items() if k != "anyOf"}
    if len(rest) == 1:
        return {**rest[0], **outer}
    return {**outer, "anyOf": rest}
