"""Every endpoint's actual responses match what /openapi.json publishes for them (status and body schema).

The routes return their pydantic response models, so FastAPI publishes exactly what it sends; this test
checks it from the outside, for every operation in the schema (an operation added without a case here
fails the coverage check), on success and on a typical error.
"""

from __future__ import annotations

import httpx
import jsonschema
import pytest

from tests.servers import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SHORT = {"max_tokens": 3, "temperature": 0}

# (method, path template) -> [(path, json body or None, extra headers, expected status)]
CASES: dict[tuple[str, str], list[tuple[str, dict | None, dict, int]]] = {
    ("get", "/health"): [("/health", None, {}, 200)],
    ("get", "/ready"): [("/ready", None, {}, 200)],
    ("get", "/metrics"): [("/metrics", None, {}, 200)],
    ("get", "/v1/models"): [("/v1/models", None, {}, 200)],
    ("get", "/v1/models/{model}"): [("/v1/models/cls", None, {}, 200), ("/v1/models/nope", None, {}, 404)],
    ("post", "/v1/generate"): [
        ("/v1/generate", {"prompt": "Hi", **SHORT}, {}, 200),
        ("/v1/generate", {"prompt": "Hi", "logprobs": 2, **SHORT}, {}, 200),
        ("/v1/generate", {"prompt": "Hi", "max_tokens": -1}, {}, 400),
    ],
    ("post", "/v1/classify"): [
        ("/v1/classify", {"text": ["good", "bad"]}, {}, 200),
        ("/v1/classify", {"text": "good", "model": "nope"}, {}, 404),
    ],
    ("post", "/v1/translate"): [
        ("/v1/translate", {"text": ["A dog.", "A cat."], "max_tokens": 3}, {}, 200),
        ("/v1/translate", {"text": "A dog.", "source": "fr"}, {}, 400),
    ],
    ("post", "/v1/completions"): [
        ("/v1/completions", {"prompt": ["Hi", "Go"], "n": 2, **SHORT}, {}, 200),
        ("/v1/completions", {"prompt": [5, 6], "logprobs": 1, "echo": True, **SHORT}, {}, 200),
        ("/v1/completions", {"prompt": "Hi", "bogus": 1}, {}, 422),
    ],
    ("post", "/v1/chat/completions"): [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                                  "top_logprobs": 2, **SHORT}, {}, 200),
    ],
    ("post", "/v1/embeddings"): [
        ("/v1/embeddings", {"input": ["a dog", "a cat"]}, {}, 200),
        ("/v1/embeddings", {"input": "a dog", "encoding_format": "base64"}, {}, 200),
    ],
    ("post", "/tokenize"): [("/tokenize", {"prompt": "once upon", "return_token_strs": True}, {}, 200)],
    ("post", "/detokenize"): [("/detokenize", {"tokens": [1, 2, 3]}, {}, 200),
                              ("/detokenize", {"tokens": [10**6]}, {}, 400)],
    ("post", "/v1/adapters"): [("/v1/adapters", {"name": "openapi-cls", "path": "cls"}, ADMIN, 201),
                               ("/v1/adapters", {"name": "x", "path": "../../etc"}, ADMIN, 400)],
    ("delete", "/v1/adapters/{name}"): [("/v1/adapters/openapi-cls", None, ADMIN, 200),
                                        ("/v1/adapters/openapi-cls", None, ADMIN, 404)],
}


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(server.url + "/openapi.json", timeout=30).json()


def body_validator(openapi: dict, method: str, path: str, status: int) -> tuple[str, jsonschema.Validator | None]:
    """The media type the schema publishes for this response, and a validator of its JSON body (None: not JSON)."""
    response = openapi["paths"][path][method]["responses"][str(status)]
    media_type, content = next(iter(response["content"].items()))
    if media_type != "application/json":
        return media_type, None
    # an empty schema would accept anything: every JSON response is published as a model
    assert "$ref" in content["schema"], f"{method} {path} {status}: no response model in the schema"
    # the response's schema, with the document's components beside it so that its $refs resolve
    schema = {**content["schema"], "components": openapi["components"]}
    return media_type, jsonschema.Draft202012Validator(schema)


def test_every_operation_in_the_schema_has_a_case(openapi):
    published = {(method, path) for path, ops in openapi["paths"].items() for method in ops}
    assert published == set(CASES)


def test_responses_match_the_published_schemas(openapi, http):
    for (method, template), cases in CASES.items():
        for path, body, headers, expected in cases:
            response = http.request(method.upper(), path, json=body, headers=headers)
            assert response.status_code == expected, (path, body, response.text)
            media_type, validator = body_validator(openapi, method, template, expected)
            assert response.headers["content-type"].split(";")[0] == media_type.split(";")[0], path
            if validator is not None:
                errors = [e.message for e in validator.iter_errors(response.json())]
                assert not errors, (path, body, errors, response.json())


def test_the_validator_rejects_a_body_that_drifts_from_the_schema(openapi):
    """Negative control: the check above would notice a response that does not match."""
    _, validator = body_validator(openapi, "post", "/v1/completions", 200)
    good = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "base",
            "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    assert validator.is_valid(good)
    assert not validator.is_valid({k: v for k, v in good.items() if k != "choices"})  # a missing field
    assert not validator.is_valid({**good, "usage": {"prompt_tokens": "1"}})  # a nested wrong type
    _, error_validator = body_validator(openapi, "post", "/v1/completions", 404)
    assert not error_validator.is_valid({"detail": "Not Found"})  # not the one error shape

