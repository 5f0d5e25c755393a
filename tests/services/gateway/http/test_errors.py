"""The one map from kvpool's exception tree to HTTP statuses and OpenAI's error body."""

import json

import pytest

from kvpool import errors
from services.gateway.http.errors import TOO_LARGE, HttpError, error_body


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (errors.InvalidArgument("bad"), 400, "invalid_request_error"),
        (ValueError("bad"), 400, "invalid_request_error"),
        (errors.Unauthenticated("who"), 401, "authentication_error"),
        (errors.NotFound("gone"), 404, "not_found_error"),
        (HttpError(TOO_LARGE, "big"), 413, "invalid_request_error"),
        (errors.ResourceExhausted("full"), 429, "rate_limit_error"),
        (errors.DataLoss("torn"), 500, "server_error"),
        (errors.Unavailable("down"), 503, "service_unavailable_error"),
    ],
)
def test_each_error_gets_its_status_and_keeps_its_message(exc, status, type_):
    got, body = error_body(exc)
    error = json.loads(body)["error"]
    assert got == status and error["type"] == type_ and error["message"] == str(exc)
    assert set(error) == {"message", "type", "param", "code"}


def test_a_bug_is_500_without_internals(caplog):
    status, body = error_body(KeyError("secret internals"))
    assert status == 500
    assert "secret" not in body.decode() and "server log" in json.loads(body)["error"]["message"]
    assert "unexpected error" in caplog.text
