"""The Flask extension with Flask's test client: memory store, then a real NATS server."""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Blueprint, Flask, Response, request
from flask.testing import FlaskClient
from flask.views import MethodView
from werkzeug.exceptions import HTTPException, ServiceUnavailable, TooManyRequests
from werkzeug.test import TestResponse

from ratesync_middleware import ConfigError
from ratesync_middleware.facts import RequestFacts
from ratesync_middleware.flask import RateLimit, RateLimitExceeded, RateLimitUnavailable, limit

ROOT = Path(__file__).resolve().parents[1]

CONFIG: dict[str, Any] = {
    "limiters": {
        "api": {"rate_per_second": 0.01, "burst": 5},
        "login": {"limit": "2/minute"},
        "search": {"rate_per_second": 0.01, "burst": 3},
    },
    "middleware": {"default": "api"},
}


def with_config(**changes: Any) -> dict[str, Any]:
    merged: dict[str, Any] = json.loads(json.dumps(CONFIG))
    for section, values in changes.items():
        if isinstance(values, dict):
            merged.setdefault(section, {}).update(values)
        else:
            merged[section] = values
    return merged


def create_app(config: Any = CONFIG, **options: Any) -> tuple[Flask, RateLimit]:
    """The app most tests use: a default-limited page, a login, a health check."""
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=config, **options)

    @app.get("/")
    def index() -> str:
        return "hello"

    @app.post("/login")
    @ratelimit.limit("login")
    def login() -> str:
        return "welcome"

    @app.get("/health")
    @ratelimit.exempt
    def health() -> str:
        return "ok"

    return app, ratelimit


def statuses(
    client: FlaskClient, count: int, path: str = "/", method: str = "GET", **kw: Any
) -> list[int]:
    return [client.open(path, method=method, **kw).status_code for _ in range(count)]


# --- the basic contract ----------------------------------------------------------------------


def test_burst_then_429_with_retry_after() -> None:
    app, _ = create_app()
    client = app.test_client()

    assert statuses(client, 5) == [200] * 5
    refused = client.get("/")

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "100"
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.json == {
        "type": "https://iana.org/assignments/http-problem-types#quota-exceeded",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "Rate limit 'api' exceeded.",
        "violated-policies": ["api"],
    }
    assert refused.headers["RateLimit-Policy"] == '"api";q=5;w=500'
    assert refused.headers["RateLimit"] == '"api";r=0;t=100'


def test_headers_on_every_allowed_response() -> None:
    app, _ = create_app()
    client = app.test_client()

    first, second = client.get("/"), client.get("/")

    assert first.headers["RateLimit-Policy"] == '"api";q=5;w=500'
    assert first.headers["RateLimit"] == '"api";r=4;t=100'
    assert second.headers["RateLimit"] == '"api";r=3;t=200'
    assert first.text == "hello"


@pytest.mark.parametrize(
    ("mode", "allowed", "absent"),
    [
        ("draft", {"RateLimit-Policy", "RateLimit"}, {"X-RateLimit-Limit"}),
        (
            "legacy",
            {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"},
            {"RateLimit"},
        ),
        ("none", set(), {"RateLimit", "RateLimit-Policy", "X-RateLimit-Limit"}),
    ],
)
def test_header_modes(mode: str, allowed: set[str], absent: set[str]) -> None:
    app, _ = create_app(with_config(middleware={"headers": mode}))
    client = app.test_client()

    response = client.get("/")
    statuses(client, 4)
    refused = client.get("/")

    assert allowed <= set(response.headers.keys())
    assert not absent & set(response.headers.keys())
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "100"  # in every mode
    if mode == "legacy":
        assert response.headers["X-RateLimit-Limit"] == "5"
        assert response.headers["X-RateLimit-Remaining"] == "4"


def test_limit_decorator_uses_its_own_limiter() -> None:
    app, _ = create_app()
    client = app.test_client()

    logged_in = client.post("/login")

    assert logged_in.headers["RateLimit-Policy"] == '"login";q=2;w=60'
    assert statuses(client, 2, "/login", "POST") == [200, 429]
    assert client.get("/").headers["RateLimit"] == '"api";r=4;t=100'  # another bucket


def test_exempt_view_is_never_limited_and_has_no_headers() -> None:
    app, _ = create_app(with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}}))
    client = app.test_client()

    assert statuses(client, 10, "/health") == [200] * 10
    assert "RateLimit" not in client.get("/health").headers
    assert statuses(client, 2) == [200, 429]


def test_several_limiters_and_a_cost() -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=CONFIG)

    @app.get("/export")
    @ratelimit.limit("search", cost=3)
    def export() -> str:
        return "csv"

    @app.get("/both")
    @ratelimit.limit("login", "api")
    def both() -> str:
        return "both"

    client = app.test_client()
    assert statuses(client, 2, "/export") == [200, 429]  # one request empties a burst of 3
    assert statuses(client, 3, "/both") == [200, 200, 429]  # login (2/minute) runs out first
    assert client.get("/both").json["violated-policies"] == ["login"]  # type: ignore[index]


def test_a_refused_request_never_reaches_the_view() -> None:
    app = Flask(__name__)
    RateLimit(app, config=with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 2}}))
    calls: list[str] = []

    @app.get("/")
    def index() -> str:
        calls.append("called")
        return "hello"

    assert statuses(app.test_client(), 4) == [200, 200, 429, 429]
    assert calls == ["called", "called"]


def test_head_is_limited_like_get_and_has_no_body() -> None:
    app, _ = create_app(with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}}))
    client = app.test_client()

    assert client.head("/").status_code == 200
    refused = client.head("/")

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "100"
    assert refused.data == b""


def test_unmatched_paths_count_toward_the_default() -> None:
    # Scanning for URLs is traffic too: 404s spend from the default limiter like any request.
    app, _ = create_app(with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 2}}))
    client = app.test_client()

    assert statuses(client, 3, "/no/such/page") == [404, 404, 429]
    assert client.get("/").status_code == 429  # the same bucket: one per client address


def test_current_decision_in_a_view() -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=CONFIG)

    @app.get("/")
    def index() -> dict[str, Any]:
        decision = ratelimit.current_decision
        assert decision is not None
        return {"remaining": decision.remaining, "policy": decision.policy}

    @app.get("/health")
    @ratelimit.exempt
    def health() -> dict[str, Any]:
        return {"decision": ratelimit.current_decision}

    client = app.test_client()
    assert client.get("/").json == {"remaining": 4, "policy": "api"}
    assert client.get("/health").json == {"decision": None}


# --- options: constructor, app.config, defaults ------------------------------------------------

TOML = """
[limiters.api]
rate_per_second = 0.01
burst = {burst}

[middleware]
default = "api"
"""


def write_config(directory: Path, burst: int) -> Path:
    path = directory / "rate-sync.toml"
    path.write_text(TOML.format(burst=burst))
    return path


def burst_of(app: Flask) -> list[int]:
    """The statuses of as many requests as it takes to be refused (at most 10)."""
    client = app.test_client()
    seen = []
    for _ in range(10):
        seen.append(client.get("/").status_code)
        if seen[-1] == 429:
            break
    return seen


def plain_app() -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def index() -> str:
        return "hello"

    return app


def test_app_factory_with_the_config_in_app_config(tmp_path: Path) -> None:
    ratelimit = RateLimit()

    def make_app() -> Flask:
        app = plain_app()
        app.config["RATESYNC_CONFIG"] = str(write_config(tmp_path, burst=2))
        ratelimit.init_app(app)
        return app

    assert burst_of(make_app()) == [200, 200, 429]


def test_the_constructor_wins_over_app_config(tmp_path: Path) -> None:
    app = plain_app()
    app.config["RATESYNC_CONFIG"] = str(write_config(tmp_path, burst=4))
    RateLimit(app, config=with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}}))

    assert burst_of(app) == [200, 429]


def test_without_options_the_config_is_discovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    write_config(tmp_path, burst=3)
    monkeypatch.chdir(tmp_path)
    app = plain_app()
    RateLimit(app)

    assert burst_of(app) == [200, 200, 200, 429]


def test_app_config_may_hold_the_tables_inline() -> None:
    app = plain_app()
    app.config["RATESYNC_CONFIG"] = with_config(
        limiters={"api": {"rate_per_second": 0.01, "burst": 1}}
    )
    RateLimit().init_app(app)

    assert burst_of(app) == [200, 429]


def test_two_apps_in_one_process_each_with_its_own_config() -> None:
    ratelimit = RateLimit()  # one extension object, two apps: state lives on each app
    small, large = plain_app(), plain_app()
    small.config["RATESYNC_CONFIG"] = with_config(
        limiters={"api": {"rate_per_second": 0.01, "burst": 2}}
    )
    large.config["RATESYNC_CONFIG"] = with_config(
        limiters={"api": {"rate_per_second": 0.01, "burst": 4}}
    )
    ratelimit.init_app(small)
    ratelimit.init_app(large)

    assert burst_of(small) == [200, 200, 429]
    assert burst_of(large) == [200] * 4 + [429]
    assert small.extensions["ratesync"] is not large.extensions["ratesync"]


def test_hooks_are_registered_once_per_app() -> None:
    app = plain_app()
    ratelimit = RateLimit(app, config=CONFIG)
    ratelimit.init_app(app)  # again, e.g. from a factory called twice: no second check
    RateLimit(app, config=CONFIG)

    assert len(app.before_request_funcs[None]) == 1
    assert len(app.after_request_funcs[None]) == 1
    client = app.test_client()
    assert client.get("/").headers["RateLimit"] == '"api";r=4;t=100'  # one token, not three


def test_disabled_registers_nothing() -> None:
    app = plain_app()
    app.config["RATESYNC_ENABLED"] = False
    RateLimit(app, config=with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}}))

    assert statuses(app.test_client(), 5) == [200] * 5
    assert "ratesync" not in app.extensions
    assert not app.before_request_funcs


def test_options_must_be_booleans() -> None:
    app = plain_app()
    app.config["RATESYNC_ENABLED"] = "no"
    with pytest.raises(TypeError, match="RATESYNC_ENABLED"):
        RateLimit(app, config=CONFIG)


# --- blueprints, route rules and precedence --------------------------------------------------


def test_blueprint_marks_apply_to_every_view_of_the_blueprint() -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=CONFIG)
    search = Blueprint("search", __name__, url_prefix="/search")
    admin = Blueprint("admin", __name__, url_prefix="/admin")
    reports = Blueprint("reports", __name__, url_prefix="/reports")

    @search.get("/")
    def find() -> str:
        return "results"

    @search.post("/login")
    @ratelimit.limit("login")  # the view's own mark wins over its blueprint's
    def search_login() -> str:
        return "welcome"

    @admin.get("/")
    def dashboard() -> str:
        return "dashboard"

    @reports.get("/")
    def report() -> str:
        return "report"

    ratelimit.limit("search")(search)
    ratelimit.exempt(admin)
    admin.register_blueprint(reports)  # nested: inherits the parent's marks
    app.register_blueprint(search)
    app.register_blueprint(admin)

    client = app.test_client()
    assert client.get("/search/").headers["RateLimit-Policy"] == '"search";q=3;w=300'
    assert statuses(client, 3, "/search/") == [200, 200, 429]
    assert client.post("/search/login").headers["RateLimit-Policy"] == '"login";q=2;w=60'
    assert statuses(client, 10, "/admin/") == [200] * 10
    assert statuses(client, 10, "/admin/reports/") == [200] * 10
    assert "RateLimit" not in client.get("/admin/reports/").headers


def test_a_nested_blueprint_mark_wins_over_its_parent() -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=CONFIG)
    api = ratelimit.exempt(Blueprint("api", __name__, url_prefix="/api"))
    auth = ratelimit.limit("login")(Blueprint("auth", __name__, url_prefix="/auth"))

    @auth.post("/token")
    def token() -> str:
        return "token"

    api.register_blueprint(auth)
    app.register_blueprint(api)

    assert statuses(app.test_client(), 3, "/api/auth/token", "POST") == [200, 200, 429]


RULES = [
    {"path": "/auth/*", "methods": ["POST"], "limiters": ["login"]},
    {"path": "/status", "exempt": True},
    {"path": "/search/*", "limiters": ["search"]},
]


def test_route_rules_and_precedence() -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=with_config(routes=RULES))
    catalogue = ratelimit.limit("api")(Blueprint("catalogue", __name__, url_prefix="/search/c"))

    @app.post("/auth/token")
    def token() -> str:
        return "token"

    @app.get("/auth/token")
    def token_info() -> str:
        return "info"

    @app.get("/status")
    def status() -> str:
        return "ok"

    @app.get("/search/fast")
    @ratelimit.limit("login")
    def fast_search() -> str:
        return "fast"

    @app.get("/search/slow")
    def slow_search() -> str:
        return "slow"

    @catalogue.get("/")
    def browse() -> str:
        return "catalogue"

    app.register_blueprint(catalogue)

    def policy(path: str, method: str = "GET") -> str:
        response = app.test_client().open(path, method=method)
        return response.headers.get("RateLimit-Policy", "none")

    assert policy("/auth/token", "POST") == '"login";q=2;w=60'  # rule
    assert policy("/auth/token") == '"api";q=5;w=500'  # the rule is POST only: default
    assert policy("/status") == "none"  # exempt by rule
    assert policy("/search/slow") == '"search";q=3;w=300'  # rule
    assert policy("/search/fast") == '"login";q=2;w=60'  # view mark > rule
    assert policy("/search/c/") == '"api";q=5;w=500'  # blueprint mark > rule
    assert policy("/elsewhere") == '"api";q=5;w=500'  # 404: default


def test_without_a_default_only_named_routes_are_limited() -> None:
    config = with_config(routes=RULES)
    del config["middleware"]
    app, _ = create_app(config)
    client = app.test_client()

    assert statuses(client, 10) == [200] * 10
    assert "RateLimit" not in client.get("/").headers
    assert statuses(client, 3, "/login", "POST") == [200, 200, 429]  # the decorator still counts


def test_class_based_views() -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=CONFIG)

    class Session(MethodView):
        def get(self) -> str:
            return "session"

        @ratelimit.limit("login")
        def post(self) -> str:
            return "created"

    @ratelimit.limit("search")
    class Search(MethodView):
        def get(self) -> str:
            return "results"

    app.add_url_rule("/session", view_func=Session.as_view("session"))
    app.add_url_rule("/search", view_func=Search.as_view("search"))
    client = app.test_client()

    assert client.post("/session").headers["RateLimit-Policy"] == '"login";q=2;w=60'
    assert client.get("/session").headers["RateLimit-Policy"] == '"api";q=5;w=500'
    assert client.head("/session").headers["RateLimit-Policy"] == '"api";q=5;w=500'
    assert client.get("/search").headers["RateLimit-Policy"] == '"search";q=3;w=300'


def test_static_files_are_exempt_unless_asked(tmp_path: Path) -> None:
    (tmp_path / "app.css").write_text("body {}")
    config = with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}})

    exempt_app = Flask(__name__, static_folder=str(tmp_path), static_url_path="/static")
    RateLimit(exempt_app, config=config)
    limited_app = Flask(__name__, static_folder=str(tmp_path), static_url_path="/static")
    limited_app.config["RATESYNC_EXEMPT_STATIC"] = False
    RateLimit(limited_app, config=config)

    assert statuses(exempt_app.test_client(), 5, "/static/app.css") == [200] * 5
    assert statuses(limited_app.test_client(), 2, "/static/app.css") == [200, 429]


def test_a_typo_in_a_mark_fails_when_the_decorator_runs() -> None:
    app, ratelimit = create_app()

    with pytest.raises(ConfigError, match="did you mean 'login'") as raised:

        @app.get("/typo")
        @ratelimit.limit("logn")
        def typo() -> str:
            return "never"

    assert "\n" not in str(raised.value)


def accounts_blueprint(ratelimit: RateLimit, name: str) -> Blueprint:
    accounts = Blueprint("accounts", __name__)

    @accounts.post("/login")
    @ratelimit.limit(name)
    def login() -> str:
        return "welcome"

    return accounts


@pytest.mark.parametrize("blueprint_first", [True, False])
def test_a_typo_in_a_mark_made_before_init_app_fails_at_init_app(blueprint_first: bool) -> None:
    ratelimit = RateLimit()  # module level, as in an app factory
    accounts = accounts_blueprint(ratelimit, "logn")  # decorated at import, before any app
    app = Flask(__name__)
    app.config["RATESYNC_CONFIG"] = CONFIG
    if blueprint_first:
        app.register_blueprint(accounts)

    with pytest.raises(ConfigError, match="did you mean 'login'"):
        ratelimit.init_app(app)


def test_a_typo_in_a_mark_made_after_init_app_fails_when_the_decorator_runs() -> None:
    ratelimit = RateLimit()
    app = Flask(__name__)
    app.config["RATESYNC_CONFIG"] = CONFIG
    ratelimit.init_app(app)

    with pytest.raises(ConfigError, match="did you mean 'login'"):
        accounts_blueprint(ratelimit, "logn")
    app.register_blueprint(accounts_blueprint(ratelimit, "login"))  # the fixed name is fine
    assert statuses(app.test_client(), 3, "/login", "POST") == [200, 200, 429]


def test_a_bare_mark_with_a_typo_fails_its_own_route_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = create_app()

    @app.get("/typo")
    @limit("logn")  # not checked by the extension: found at start-up
    def typo() -> str:
        return "never"

    client = app.test_client()
    with caplog.at_level(logging.ERROR, "ratesync_middleware"):
        assert client.get("/health").status_code == 200
    assert client.get("/").status_code == 200
    assert client.post("/login").status_code == 200
    assert client.get("/typo").status_code == 500
    logged = [record.getMessage() for record in caplog.records]
    assert any("no limiter 'logn' (did you mean 'login'?)" in line for line in logged)


def test_startup_refuses_a_bare_mark_with_a_typo() -> None:
    app, ratelimit = create_app()

    @app.get("/typo")
    @limit("logn")
    def typo() -> str:
        return "never"

    with pytest.raises(ConfigError, match="did you mean 'login'"):
        ratelimit.startup(app)


def test_a_mark_of_a_view_registered_before_init_app_is_checked_at_init_app() -> None:
    app = Flask(__name__)

    @app.get("/typo")
    @limit("logn")
    def typo() -> str:
        return "never"

    with pytest.raises(ConfigError, match="did you mean 'login'"):
        RateLimit(app, config=CONFIG)


# --- the end of a request: count_status, settle_header, max_concurrent ----------------------


def login_app() -> Flask:
    """Logins limited to 3 a minute, of which only the failed ones (401) count."""
    config = {"limiters": {"login": {"limit": "3/minute", "count_status": [401]}}}
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=config)

    @app.post("/login")
    @ratelimit.limit("login")
    def login() -> tuple[str, int]:
        right = request.headers.get("X-Password") == "s3cret"
        return ("welcome", 200) if right else ("no", 401)

    return app


def test_count_status_is_settled_before_the_test_client_sees_the_response() -> None:
    client = login_app().test_client()
    right, wrong = {"X-Password": "s3cret"}, {"X-Password": "guess"}

    assert statuses(client, 10, "/login", "POST", headers=right) == [200] * 10
    assert statuses(client, 4, "/login", "POST", headers=wrong) == [401, 401, 401, 429]


def tokens_app() -> Flask:
    """100 tokens a day, 50 reserved per call, charged what X-Tokens says; /stream streams."""
    config = {
        "limiters": {
            "llm": {"limit": 100, "window_seconds": 86400, "cost": 50, "settle_header": "X-Tokens"}
        },
        "middleware": {"default": "llm"},
    }
    app = Flask(__name__)
    RateLimit(app, config=config)

    @app.get("/complete")
    def complete() -> tuple[str, dict[str, str]]:
        return "an answer", {"X-Tokens": "10"}

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            yield from ("an ", "answer")

        return Response(chunks(), headers={"X-Tokens": "10"})

    return app


def remaining(response: TestResponse) -> int:
    return int(response.headers["RateLimit"].split(";r=")[1].split(";")[0])


def test_settle_header_is_charged_before_the_test_client_sees_the_response() -> None:
    client = tokens_app().test_client()

    assert [remaining(client.get("/complete")) for _ in range(4)] == [50, 40, 30, 20]


def test_a_streamed_response_settles_when_its_body_is_closed() -> None:
    client = tokens_app().test_client()

    streaming = client.get("/stream")  # its body is still to come: its 50 stay reserved
    assert remaining(streaming) == 50
    assert remaining(client.get("/complete")) == 0  # 50 + 50 reserved, then 10 charged
    assert streaming.get_data(as_text=True) == "an answer"
    streaming.close()  # what a server does after the last byte: charged 10 of its 50

    assert remaining(client.get("/complete")) == 30  # 100 - 10 - 10 - 50


def test_a_concurrency_slot_is_given_back_when_the_response_is_closed() -> None:
    app = Flask(__name__)
    RateLimit(
        app,
        config={"limiters": {"upload": {"max_concurrent": 1}}, "middleware": {"default": "upload"}},
    )

    @app.post("/upload")
    def upload() -> str:
        return "stored"

    client = app.test_client()
    first = client.post("/upload")  # a server has not closed it yet: the slot is held
    assert first.status_code == 200
    assert client.post("/upload").status_code == 429
    first.close()
    with client.post("/upload") as again:  # `with` closes it, as a server does
        assert again.status_code == 200
    assert client.post("/upload", buffered=True).status_code == 200  # buffered: closed too
    assert client.post("/upload", buffered=True).status_code == 200


# --- responses and error handlers ------------------------------------------------------------


def test_the_exception_is_a_werkzeug_too_many_requests() -> None:
    app, _ = create_app(with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}}))
    caught: list[RateLimitExceeded] = []

    @app.errorhandler(TooManyRequests)
    def too_many(error: RateLimitExceeded) -> tuple[dict[str, Any], int]:
        caught.append(error)
        return {"error": "slow down", "limiter": error.decision.policy}, 429

    client = app.test_client()
    client.get("/")
    refused = client.get("/")

    assert refused.status_code == 429
    assert refused.json == {"error": "slow down", "limiter": "api"}
    # The handler's response still tells the client when to come back.
    assert refused.headers["Retry-After"] == "100"
    assert refused.headers["RateLimit"] == '"api";r=0;t=100'
    (error,) = caught
    assert isinstance(error, RateLimitExceeded)
    assert isinstance(error, TooManyRequests)
    assert error.code == 429
    assert error.retry_after == 100
    assert error.description == "Rate limit 'api' exceeded."
    assert not error.decision.allowed


def test_an_error_handler_for_the_class_or_the_code() -> None:
    app, _ = create_app(with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}}))

    @app.errorhandler(RateLimitExceeded)
    def refused_page(error: RateLimitExceeded) -> tuple[str, int, dict[str, str]]:
        return "<h1>Slow down</h1>", 429, {"Retry-After": "7"}

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[str, int]:
        return "nothing here", 404

    client = app.test_client()
    client.get("/")
    refused = client.get("/")

    assert refused.text == "<h1>Slow down</h1>"
    assert refused.headers["Retry-After"] == "7"  # the handler's own value is kept
    assert refused.headers["RateLimit-Policy"] == '"api";q=1;w=100'


@pytest.mark.parametrize("catches", [429, HTTPException, Exception, "blueprint 429"])
def test_any_handler_that_would_catch_the_refusal_gets_it(catches: Any) -> None:
    app, _ = create_app(with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}}))

    def handler(error: Exception) -> tuple[str, int]:
        return f"handled {type(error).__name__}", 429

    path = "/"
    if catches == "blueprint 429":  # a blueprint's handler answers for its own views
        extra = Blueprint("extra", __name__, url_prefix="/extra")
        extra.add_url_rule("/", "index", lambda: "extra")
        extra.register_error_handler(429, handler)
        app.register_blueprint(extra)
        path = "/extra/"
    else:
        app.register_error_handler(catches, handler)

    client = app.test_client()
    assert client.get(path).status_code == 200
    refused = client.get(path)
    assert refused.status_code == 429
    assert refused.text == "handled RateLimitExceeded"


def test_headers_reach_responses_of_other_errors_too() -> None:
    app, _ = create_app()
    missing = app.test_client().get("/nothing-here")

    assert missing.status_code == 404
    assert missing.headers["RateLimit"] == '"api";r=4;t=100'


def test_a_cost_above_the_burst_is_refused_without_retry_after() -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=CONFIG)

    @app.get("/huge")
    @ratelimit.limit("search", cost=4)
    def huge() -> str:
        return "never"

    refused = app.test_client().get("/huge")

    assert refused.status_code == 429
    assert "Retry-After" not in refused.headers
    assert "can never be allowed" in refused.json["detail"]  # type: ignore[index]


# --- client identity -------------------------------------------------------------------------


def test_spoofed_x_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    app, _ = create_app(with_config(middleware={"trusted_proxies": ["10.0.0.0/8"]}))
    client = app.test_client()
    peer = {"REMOTE_ADDR": "198.51.100.7"}

    seen = [
        client.get("/", environ_base=peer, headers={"X-Forwarded-For": f"203.0.113.{n}"})
        for n in range(6)
    ]

    assert [response.status_code for response in seen] == [200] * 5 + [429]


def test_x_forwarded_for_from_a_trusted_proxy_separates_clients() -> None:
    app, _ = create_app(with_config(middleware={"trusted_proxies": ["10.0.0.0/8"]}))
    client = app.test_client()
    proxy = {"REMOTE_ADDR": "10.0.0.2"}

    first = statuses(client, 6, environ_base=proxy, headers={"X-Forwarded-For": "203.0.113.1"})
    second = statuses(client, 1, environ_base=proxy, headers={"X-Forwarded-For": "203.0.113.2"})

    assert first == [200] * 5 + [429]
    assert second == [200]


def test_header_and_path_keys() -> None:
    config = with_config(
        limiters={
            "api": {"rate_per_second": 0.01, "burst": 1, "key": "header:X-API-Key"},
            "search": {"rate_per_second": 0.01, "burst": 1, "key": "path"},
        },
        routes=[{"path": "/p/*", "limiters": ["search"]}],
    )
    app = plain_app()
    RateLimit(app, config=config)

    @app.get("/p/<name>")
    def page(name: str) -> str:
        return name

    client = app.test_client()
    assert statuses(client, 2, headers={"X-API-Key": "k1"}) == [200, 429]
    assert statuses(client, 2, headers={"X-API-Key": "k2"}) == [200, 429]
    assert statuses(client, 2, "/p/a") == [200, 429]
    assert statuses(client, 1, "/p/b") == [200]


class FakeCurrentUser:
    """Stands in for `flask_login.current_user`: authenticated when the request says so."""

    @property
    def is_authenticated(self) -> bool:
        return "X-User" in request.headers

    def get_id(self) -> str:
        return request.headers["X-User"]


def test_user_key_uses_flask_login_current_user(monkeypatch: pytest.MonkeyPatch) -> None:
    # flask_login is not a dependency: a module of the same shape stands in for it.
    flask_login = types.ModuleType("flask_login")
    flask_login.current_user = FakeCurrentUser()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flask_login", flask_login)
    app, _ = create_app(
        with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 2, "key": "user"}})
    )
    client = app.test_client()

    assert statuses(client, 3, headers={"X-User": "ada"}) == [200, 200, 429]
    assert statuses(client, 2, headers={"X-User": "bob"}) == [200, 200]
    assert statuses(client, 3) == [200, 200, 429]  # anonymous: by address


def test_user_key_without_flask_login_is_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "flask_login", raising=False)
    app, _ = create_app(
        with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 2, "key": "user"}})
    )
    client = app.test_client()

    assert statuses(client, 3, headers={"X-User": "ada"}) == [200, 200, 429]
    assert statuses(client, 1, headers={"X-User": "bob"}) == [429]


def tenant(facts: RequestFacts) -> str | None:
    """A `"pkg.mod:func"` key: `facts.request` is the Flask request."""
    tenant_id: str | None = facts.request.args.get("tenant")
    return tenant_id


def test_a_key_function_receives_the_flask_request() -> None:
    app, _ = create_app(
        with_config(
            limiters={
                "api": {"rate_per_second": 0.01, "burst": 1, "key": "tests.test_flask:tenant"}
            }
        )
    )
    client = app.test_client()

    assert statuses(client, 2, "/?tenant=a") == [200, 429]
    assert statuses(client, 1, "/?tenant=b") == [200]


# --- the example -----------------------------------------------------------------------------


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location(
        "flask_example", ROOT / "examples" / "flask" / "app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flask_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATESYNC_ENGINE", raising=False)
    example = load_example()
    client: FlaskClient = example.app.test_client()

    assert statuses(client, 6) == [200] * 5 + [429]
    assert statuses(client, 4, "/login", "POST") == [200, 200, 200, 429]
    assert statuses(client, 10, "/health") == [200] * 10
    assert statuses(client, 11, "/api/items") == [200] * 10 + [429]
    refused = client.get("/api/items")
    assert refused.json["error"] == "rate limit exceeded"  # type: ignore[index]
    assert refused.headers["Retry-After"]


# --- on a real NATS server -------------------------------------------------------------------


def closed_port() -> int:
    """A port nothing listens on (just released by the OS)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def on_store(store: dict[str, Any], **limiter: Any) -> dict[str, Any]:
    return {
        "stores": {"shared": store},
        "limiters": {
            "api": {"store": "shared", "rate_per_second": 0.01, "burst": 3, **limiter},
            "login": {"store": "shared", "limit": "2/minute"},
        },
        "middleware": {"default": "api"},
    }


@pytest.mark.nats
def test_nats_burst_then_429(nats_store: dict[str, Any]) -> None:
    app, ratelimit = create_app(on_store(nats_store))
    client = app.test_client()
    try:
        assert statuses(client, 3) == [200] * 3
        refused = client.get("/")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "100"
        assert refused.headers["RateLimit-Policy"] == '"api";q=3;w=300'
        assert statuses(client, 3, "/login", "POST") == [200, 200, 429]
        assert statuses(client, 5, "/health") == [200] * 5
    finally:
        ratelimit.close(app)


@pytest.mark.nats
def test_nats_two_apps_share_one_bucket(nats_store: dict[str, Any]) -> None:
    # Two apps on one bucket stand for two processes: the limit is the fleet's, not each app's.
    first, first_limit = create_app(on_store(nats_store))
    second, second_limit = create_app(on_store(nats_store))
    try:
        seen = [app.test_client().get("/").status_code for app in (first, second) * 3]
        assert sorted(seen) == [200] * 3 + [429] * 3
    finally:
        first_limit.close(first)
        second_limit.close(second)


@pytest.mark.nats
def test_a_dead_nats_under_fail_closed_answers_503() -> None:
    dead = {"engine": "nats", "url": f"nats://127.0.0.1:{closed_port()}", "connect_timeout": 0.2}
    app, ratelimit = create_app(on_store(dead, fail_closed=True))
    client = app.test_client()
    try:
        started = time.monotonic()
        refused = [client.get("/") for _ in range(3)]
        elapsed = time.monotonic() - started

        assert [response.status_code for response in refused] == [503] * 3
        assert refused[0].headers["Retry-After"] == "1"  # the store's back-off
        assert refused[0].headers["Content-Type"] == "application/problem+json"
        assert refused[0].json["status"] == 503  # type: ignore[index]
        assert elapsed < 5.0
        assert client.get("/health").status_code == 200
    finally:
        ratelimit.close(app)


@pytest.mark.nats
def test_a_dead_nats_503_goes_through_the_apps_handler() -> None:
    dead = {"engine": "nats", "url": f"nats://127.0.0.1:{closed_port()}", "connect_timeout": 0.2}
    app, ratelimit = create_app(on_store(dead, fail_closed=True))
    caught: list[RateLimitUnavailable] = []

    @app.errorhandler(503)
    def unavailable(error: RateLimitUnavailable) -> tuple[str, int]:
        caught.append(error)
        return "maintenance", 503

    try:
        response = app.test_client().get("/")
    finally:
        ratelimit.close(app)

    assert (response.status_code, response.text) == (503, "maintenance")
    assert response.headers["Retry-After"] == "1"
    (error,) = caught
    assert isinstance(error, ServiceUnavailable)
    assert error.decision.degraded


@pytest.mark.nats
def test_a_dead_nats_under_fail_open_lets_requests_through() -> None:
    dead = {"engine": "nats", "url": f"nats://127.0.0.1:{closed_port()}", "connect_timeout": 0.2}
    app, ratelimit = create_app(on_store(dead))
    try:
        responses = [app.test_client().get("/") for _ in range(5)]
    finally:
        ratelimit.close(app)

    assert [response.status_code for response in responses] == [200] * 5
    assert "RateLimit" not in responses[0].headers  # a guess is not a quota to advertise
