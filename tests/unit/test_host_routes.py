"""Route templates, the route prefix, host.json options and the HTTP answer of the local Functions host."""

from __future__ import annotations

from datetime import timedelta

import azure.functions as func
import pytest

from devstack.host import HostError, HostOptions, RouteTemplate, http_answer, strip_route_prefix


def test_parameters_are_decoded_per_segment() -> None:
    route = RouteTemplate("mailboxes/{address}/authorize")
    assert route.match("mailboxes/helpdesk%40contoso.com/authorize") == {"address": "helpdesk@contoso.com"}
    # An encoded slash stays encoded, as the Functions host (ASP.NET Core) leaves it: decoded, the same URL would
    # name another mailbox here than in Azure.
    assert route.match("mailboxes/a%2Fb/authorize") == {"address": "a%2Fb"}
    assert route.match("mailboxes/a%2fb%40c.test/authorize") == {"address": "a%2fb@c.test"}
    assert route.match("mailboxes/a%252Fb/authorize") == {"address": "a%2Fb"}


def test_literal_segments_ignore_case_and_a_trailing_slash() -> None:
    route = RouteTemplate("auth/callback")
    assert route.match("Auth/CALLBACK") == {}
    assert route.match("auth/callback/") == {}


@pytest.mark.parametrize(
    "path",
    ["mailboxes", "mailboxes/a@b.com", "mailboxes/a@b.com/authorize/extra", "mailbox/a@b.com/authorize", ""],
)
def test_paths_that_do_not_match(path: str) -> None:
    assert RouteTemplate("mailboxes/{address}/authorize").match(path) is None


def test_constraints() -> None:
    route = RouteTemplate("orders/{id:int}/{flag:bool}")
    assert route.match("orders/42/true") == {"id": "42", "flag": "true"}
    assert route.match("orders/-7/False") == {"id": "-7", "flag": "False"}
    assert route.match("orders/abc/true") is None
    assert route.match("orders/42/maybe") is None
    guid = RouteTemplate("things/{id:guid}")
    assert guid.match("things/5f1c8a3e-0b7d-4c52-9a61-2d8e4f7b9c10") is not None
    assert guid.match("things/not-a-guid") is None


def test_several_parameters_in_one_segment() -> None:
    route = RouteTemplate("files/{name}.{ext:alpha}")
    assert route.match("files/report.final.pdf") == {"name": "report.final", "ext": "pdf"}
    assert route.match("files/report") is None


def test_optional_and_catch_all_parameters() -> None:
    optional = RouteTemplate("mailboxes/{address?}")
    assert optional.match("mailboxes") == {}
    assert optional.match("mailboxes/x@y.z") == {"address": "x@y.z"}
    catch_all = RouteTemplate("files/{*path}")
    assert catch_all.match("files/a/b%20c/d.txt") == {"path": "a/b c/d.txt"}
    assert catch_all.match("files") == {"path": ""}


def test_empty_template_matches_the_prefix_root_only() -> None:
    route = RouteTemplate("")
    assert route.match("") == {}
    assert route.match("x") is None


def test_specificity_prefers_literals_over_parameters() -> None:
    literal = RouteTemplate("mailboxes/export")
    param = RouteTemplate("mailboxes/{address}")
    catch_all = RouteTemplate("mailboxes/{*rest}")
    constrained = RouteTemplate("mailboxes/{id:int}")
    ordered = sorted([catch_all, param, constrained, literal], key=lambda r: r.specificity, reverse=True)
    assert ordered == [literal, constrained, param, catch_all]


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("a/{x}/{X}", "twice"),
        ("a/{x:regex(^a$)}", "not supported"),
        ("a/{x?}/b", "optional"),
        ("a/{*rest}/b", "catch-all"),
        ("a//b", "empty segment"),
        ("a/{x=1}", "default"),
        ("a/{x}}", "brace"),
        ("a/{1x}", "identifier"),
        ("a/b{x?}", "whole segment"),
    ],
)
def test_invalid_templates_name_the_problem(template: str, problem: str) -> None:
    with pytest.raises(HostError, match=problem):
        RouteTemplate(template)


def test_route_prefix() -> None:
    assert strip_route_prefix("/api/mailboxes/x", "api") == "mailboxes/x"
    assert strip_route_prefix("/API/mailboxes", "api") == "mailboxes"
    assert strip_route_prefix("/api", "api") == ""
    assert strip_route_prefix("/apix/mailboxes", "api") is None
    assert strip_route_prefix("/mailboxes", "api") is None
    assert strip_route_prefix("/mailboxes", "") == "/mailboxes"
    assert strip_route_prefix("/v1/things", "v1") == "things"


def test_host_json_options() -> None:
    assert HostOptions.from_host_json({}) == HostOptions()
    options = HostOptions.from_host_json(
        {
            "version": "2.0",
            "extensions": {
                "http": {"routePrefix": "/v1/"},
                "queues": {
                    "messageEncoding": "None",
                    "maxDequeueCount": 3,
                    "batchSize": 100,
                    "visibilityTimeout": "00:00:30",
                    "maxPollingInterval": "00:00:00.500",
                },
            },
        }
    )
    assert options.route_prefix == "v1"
    assert options.message_encoding == "none"
    assert options.max_dequeue_count == 3
    assert options.batch_size == 32  # the service's ceiling per receive
    assert options.retry_visibility == timedelta(seconds=30)
    assert options.max_polling_interval == timedelta(milliseconds=500)
    assert HostOptions.from_host_json({"extensions": {"http": {"routePrefix": ""}}}).route_prefix == ""


@pytest.mark.parametrize(
    "document",
    [
        {"extensions": {"queues": {"messageEncoding": "utf16"}}},
        {"extensions": {"queues": {"maxDequeueCount": 0}}},
        {"extensions": {"queues": {"batchSize": "4"}}},
        {"extensions": {"queues": {"visibilityTimeout": "30s"}}},
        {"extensions": {"http": {"routePrefix": 1}}},
    ],
)
def test_invalid_host_json_options(document: dict[str, object]) -> None:
    with pytest.raises(HostError, match=r"host\.json"):
        HostOptions.from_host_json(document)


def test_http_answer_keeps_repeated_headers_and_sets_a_content_type() -> None:
    response = func.HttpResponse("hé", status_code=201, headers={"X-One": "1"})
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    response.headers.add("Content-Length", "999")  # framing is the server's: dropped
    status, headers, body = http_answer(response)
    assert status == 201
    assert body == "hé".encode()
    assert [value for name, value in headers if name == "Set-Cookie"] == ["a=1", "b=2"]
    assert ("Content-Type", "text/plain; charset=utf-8") in headers
    assert not any(name.lower() == "content-length" for name, _ in headers)


def test_http_answer_keeps_the_function_s_content_type() -> None:
    response = func.HttpResponse("{}", mimetype="application/json", headers={"content-type": "application/x-custom"})
    _, headers, _ = http_answer(response)
    assert [value for name, value in headers if name.lower() == "content-type"] == ["application/x-custom"]


def test_http_answer_for_plain_return_values() -> None:
    assert http_answer(None) == (204, [], b"")
    assert http_answer("ok")[0::2] == (200, b"ok")
    with pytest.raises(TypeError, match="HttpResponse"):
        http_answer({"not": "a response"})
