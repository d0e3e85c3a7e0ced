"""Validates the router's OpenAPI document against a launched server ($LORAX_URL).

Run through scripts/ci/with_server.sh with the test venv's python (scripts/ci/pyenv.sh): the document at
/api-doc/openapi.json must be a valid OpenAPI document (openapi-spec-validator), every documented
operation must exist on the server (no 404/405), and Swagger UI at /docs must load its vendored assets.
The other direction (every served route is documented) is the Rust test
api_doc::tests::every_served_route_is_documented, which sees the router's route table.
"""

import json
import os
import re
import sys
import urllib.error
import urllib.request

from openapi_spec_validator import validate

BASE = os.environ["LORAX_URL"].rstrip("/")
EXPECTED = {
    ("post", "/"), ("post", "/generate"), ("post", "/generate_stream"), ("get", "/health"), ("get", "/info"),
    ("post", "/tokenize"), ("get", "/metrics"), ("post", "/v1/completions"), ("post", "/v1/chat/completions"),
    ("get", "/v1/models"), ("get", "/api-doc/openapi.json"), ("get", "/docs"), ("get", "/docs/{file}"),
}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def request(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method.upper())
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def main():
    status, headers, body = request("get", "/api-doc/openapi.json")
    assert status == 200, status
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    document = json.loads(body)
    validate(document)  # raises on an invalid document; detects 3.0 / 3.1 from the `openapi` field
    print(f"valid OpenAPI {document['openapi']} document: {len(document['paths'])} paths")

    operations = {(m, p) for p, item in document["paths"].items() for m in item if m in METHODS}
    missing = EXPECTED - operations
    assert not missing, f"documented operations missing: {sorted(missing)}"

    # Every documented operation exists on the server. Bodies are deliberately empty objects: the
    # answer must be a validation error (or a success), never "no such route/method".
    for method, path in sorted(operations):
        concrete = re.sub(r"\{file\}", "swagger-ui.css", path)
        body = {} if method == "post" else None
        status, _, _ = request(method, concrete, body)
        assert status not in (404, 405), f"{method.upper()} {path} is documented but answers {status}"
        print(f"  {method.upper():5} {path:24} -> {status}")

    status, headers, page = request("get", "/docs")
    assert status == 200 and headers.get("Content-Type", "").startswith("text/html"), (status, headers)
    page = page.decode()
    for asset, content_type in (("docs/swagger-ui-bundle.js", "text/javascript"), ("docs/swagger-ui.css", "text/css")):
        assert asset in page, f"/docs does not load {asset}"
        status, headers, content = request("get", "/" + asset)
        assert status == 200 and headers.get("Content-Type", "").startswith(content_type), (asset, status, headers)
        assert len(content) > 100_000, f"{asset} is only {len(content)} bytes"
    assert "SwaggerUIBundle" in page and "api-doc/openapi.json" in page
    print("Swagger UI page and assets served")
    return 0


if __name__ == "__main__":
    sys.exit(main())
