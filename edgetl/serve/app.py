"""The console's HTTP side: a Starlette application (ASGI, served by uvicorn) over :class:`edgetl.serve.console.Console`.

Security (secure by default):

- the CLI binds to 127.0.0.1 unless told otherwise and refuses another address without a token;
- every state-changing call (POST) needs the token (``Authorization: Bearer TOKEN`` or ``X-Edgetl-Token``) — a custom
  header a cross-site form or ``<img>`` cannot send — and is refused when the browser says it comes from another site
  (``Sec-Fetch-Site: cross-site``/``same-site``) or its ``Origin`` is not this server;
- bound to loopback, the ``Host`` header must name loopback too (a DNS-rebinding page gets 403); bound elsewhere,
  every call but ``GET /api/health`` and the page's own files needs the token;
- request bodies over ``max_upload`` bytes are refused (413) before they are read in full; uploaded images are decoded
  within the CLI's decode budget (:func:`edgetl.data.load_image`);
- nothing a client sends becomes a file-system path (images are named by server ids, static files by a fixed table);
- every error is JSON ``{"error": "..."}`` with a 4xx/5xx status, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgetl.errors import BundleError, DataError, EdgeTLError, NotFittedError, StateError
from edgetl.serve.console import Console

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-edgetl-token"
#: the page's files: URL path → (file in edgetl/serve/static, media type); nothing else is ever read
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript"),
          "/static/style.css": ("style.css", "text/css")}
#: reads allowed without the token even when bound beyond loopback
OPEN_PATHS = frozenset({"/api/health", *STATIC})
SECURITY_HEADERS = [
    (b"content-security-policy", (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: "
                                  b"data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                  b"frame-ancestors 'none'")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


@dataclass(frozen=True)
class ServeSettings:
    """How the console is exposed. ``token``: the secret for state changes (and for everything when not
    ``loopback``); ``host``/``port``: where it listens; ``max_upload``: largest request body in bytes."""

    token: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_upload: int = 10 << 20

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Guard:
    """ASGI middleware: host check, token, cross-site refusal, body-size limit and security headers."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.check(scope["method"], scope["path"], headers)
        if refusal is not None:
            await self._with_headers(refusal, scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_upload):
            await self._with_headers(self._too_large(), scope, receive, send)
            return
        received = 0
        too_large = False

        async def limited() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.settings.max_upload:
                    too_large = True
                    raise _TooLarge()
            return message

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        try:
            await self.app(scope, limited, secured)
        except _TooLarge:
            await self._with_headers(self._too_large(), scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return _too_large(self.settings.max_upload)

    async def _with_headers(self, response: Response, scope: Scope, receive: Receive, send: Send) -> None:
        response.headers.update({k.decode(): v.decode() for k, v in SECURITY_HEADERS})
        await response(scope, receive, send)

    def check(self, method: str, path: str, headers: dict[str, str]) -> JSONResponse | None:
        s = self.settings
        host = headers.get("host", "")
        if s.loopback and _host_name(host) not in ("127.0.0.1", "localhost", "::1"):
            return _error(403, f"Host {host[:80]!r} is not this machine's loopback address; open the console at "
                               f"http://127.0.0.1:{s.port}/")
        state_changing = method not in ("GET", "HEAD", "OPTIONS")
        if state_changing:
            site = headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return _error(403, f"cross-site request refused (Sec-Fetch-Site: {site[:40]}); call the API from the "
                                   "console page or from a program, not from another site")
            origin = headers.get("origin")
            if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
                return _error(403, f"cross-site request refused (Origin {origin[:80]!r} is not this console)")
        if state_changing or (not s.loopback and path not in OPEN_PATHS):
            given = _token(headers)
            if given is None:
                return _error(401, "this call needs the console's token: send 'Authorization: Bearer TOKEN' (the "
                                   "token is printed at start, or is the content of --token-file)")
            if not hmac.compare_digest(given.encode("utf-8", "replace"), s.token.encode("utf-8")):
                return _error(403, "wrong token; use the token printed at start or the content of --token-file")
        return None


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body larger than the limit of {limit} bytes; send a smaller image or start the "
                       "console with a larger --max-upload")


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _token(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get(TOKEN_HEADER)


# ------------------------------------------------------------------------------------------------------ handlers
async def _json_body(request: Request) -> dict[str, Any]:
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise DataError("send a JSON object with Content-Type: application/json")
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise DataError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise DataError("the request body must be a JSON object")
    return body


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DataError(f"{name} must be an integer, found {raw[:20]!r}") from None
    if not lo <= value <= hi:
        raise DataError(f"{name} must be between {lo} and {hi}, found {value}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise DataError(f"{name} must be true or false")
    return value


@dataclass
class WatcherThread:
    """The inbox watcher, run in a thread for the life of the app; ``state`` is what ``/api/health`` shows:
    ``off`` (none), ``starting``, ``running``, what the watcher returned, ``stopped`` or ``stopped: <why>``."""

    watcher: Callable[[threading.Event], str | None] | None
    state: str = field(init=False)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _thread: threading.Thread | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.state = "off" if self.watcher is None else "starting"

    def start(self) -> None:
        if self.watcher is not None:
            self._thread = threading.Thread(target=self._run, name="edgetl-serve-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self.watcher is None:
            return
        try:
            self.state = "running"
            self.state = self.watcher(self._stop) or "stopped"
        except EdgeTLError as exc:
            self.state = f"stopped: {exc}"
            log.warning("inbox watcher stopped: %s", exc)
        except Exception as exc:
            self.state = f"stopped: {type(exc).__name__}: {exc}"
            log.exception("inbox watcher crashed")

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)


@dataclass(frozen=True)
class Context:
    """What the handlers serve: kept on the Starlette app's ``state``."""

    console: Console
    settings: ServeSettings
    watcher: WatcherThread


def _ctx(request: Request) -> Context:
    ctx = request.app.state.ctx
    assert isinstance(ctx, Context)
    return ctx


def _call(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    """Run a (blocking) console call in the thread pool."""
    return run_in_threadpool(fn, *args)


async def health(request: Request) -> Response:
    ctx = _ctx(request)
    version = await _call(ctx.console.runtime.current_version)
    return JSONResponse({"status": "ok", "head_version": version, "watcher": ctx.watcher.state})


async def info(request: Request) -> Response:
    ctx = _ctx(request)
    console, settings = ctx.console, ctx.settings
    data = await _call(console.runtime.info)
    try:
        _, classes, _ = await _call(console.runtime.load_current_head)
    except NotFittedError:
        classes = []
    return JSONResponse({"bundle": data["bundle"], "backbone": data["backbone"]["id"],
                         "selected": data["selected"], "profile": data["profile"],
                         "current_head": data["current_head"], "classes": classes,
                         "inbox": str(console.inbox) if console.inbox else None, "watcher": ctx.watcher.state,
                         "max_upload": settings.max_upload, "loopback_only": settings.loopback})


async def predict(request: Request) -> Response:
    top_k = _int_param(request, "top_k", 3, 1, 100)
    data = await request.body()
    return JSONResponse(await _call(_ctx(request).console.predict_upload, data, top_k))


async def results(request: Request) -> Response:
    limit = _int_param(request, "limit", 50, 1, 1000)
    return JSONResponse({"results": await _call(_ctx(request).console.results_page, limit)})


async def queue(request: Request) -> Response:
    limit = _int_param(request, "limit", 20, 1, 500)
    return JSONResponse(await _call(_ctx(request).console.queue, limit))


async def thumb(request: Request) -> Response:
    item_id = _item_id(request.path_params["item_id"])
    return Response(await _call(_ctx(request).console.thumbnail, item_id), media_type="image/png")


async def label(request: Request) -> Response:
    body = await _json_body(request)
    record = await _call(_ctx(request).console.label, _item_id(body.get("id")), body.get("label"))
    return JSONResponse({"labelled": asdict(record)})


async def train(request: Request) -> Response:
    body = await _json_body(request)
    return JSONResponse(await _call(_ctx(request).console.train, _flag(body, "force")))


async def add_class(request: Request) -> Response:
    body = await _json_body(request)
    return JSONResponse(await _call(_ctx(request).console.add_class, body.get("name"), _flag(body, "force")))


async def history(request: Request) -> Response:
    return JSONResponse({"history": await _call(_ctx(request).console.history)})


async def promote(request: Request) -> Response:
    body = await _json_body(request)
    return JSONResponse({"current": await _call(_ctx(request).console.promote, body.get("version"))})


async def rollback(request: Request) -> Response:
    body = await _json_body(request)
    return JSONResponse({"current": await _call(_ctx(request).console.rollback, body.get("to"))})


async def drift(request: Request) -> Response:
    return JSONResponse(await _call(_ctx(request).console.drift))


async def confusion(request: Request) -> Response:
    return JSONResponse(await _call(_ctx(request).console.confusion))


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(await _call(_ctx(request).console.metrics_text), media_type=CONTENT_TYPE_LATEST)


def static(path: str) -> Callable[[Request], Awaitable[Response]]:
    """The handler of one of the page's files (read once, from the fixed :data:`STATIC` table)."""
    name, media = STATIC[path]
    body = resources.files("edgetl.serve").joinpath("static", name).read_bytes()

    async def serve(request: Request) -> Response:
        return Response(body, media_type=media)
    return serve


#: the API: path, handler, method
API: tuple[tuple[str, Callable[[Request], Awaitable[Response]], str], ...] = (
    ("/api/health", health, "GET"),
    ("/api/info", info, "GET"),
    ("/api/predict", predict, "POST"),
    ("/api/results", results, "GET"),
    ("/api/queue", queue, "GET"),
    ("/api/image/{item_id}", thumb, "GET"),
    ("/api/label", label, "POST"),
    ("/api/train", train, "POST"),
    ("/api/add-class", add_class, "POST"),
    ("/api/history", history, "GET"),
    ("/api/promote", promote, "POST"),
    ("/api/rollback", rollback, "POST"),
    ("/api/drift", drift, "GET"),
    ("/api/confusion", confusion, "GET"),
    ("/metrics", metrics, "GET"),
)


# ------------------------------------------------------------------------------------------------ error handlers
async def on_edgetl_error(request: Request, exc: Exception) -> Response:
    status = 409 if isinstance(exc, (StateError, NotFittedError)) else 500 if isinstance(exc, BundleError) else 400
    return _error(status, " ".join(str(exc).split())[:1000])


async def on_lookup(request: Request, exc: Exception) -> Response:
    return _error(404, str(exc).strip("'\""))


async def on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: f"no such endpoint {request.url.path[:100]!r}; see GET /api/info and the README",
                405: f"{request.method} is not allowed on {request.url.path[:100]}"}
    return _error(exc.status_code, messages.get(exc.status_code, str(exc.detail)))


async def on_too_large(request: Request, exc: Exception) -> Response:
    return _too_large(_ctx(request).settings.max_upload)


async def on_crash(request: Request, exc: Exception) -> Response:
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error ({type(exc).__name__}); see the console's log")


def create_app(console: Console, settings: ServeSettings,
               watcher: Callable[[threading.Event], str | None] | None = None) -> ASGIApp:
    """The ASGI application. ``watcher``: run in a thread for the life of the app (the inbox watcher), stopped on
    shutdown through the event it is given; what it returns is shown as the watcher's state."""
    ctx = Context(console, settings, WatcherThread(watcher))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ctx.watcher.start()
        try:
            yield
        finally:
            await ctx.watcher.stop()
            console.close()

    routes = [Route(path, static(path), methods=["GET"]) for path in STATIC] + \
        [Route(path, handler, methods=[method]) for path, handler, method in API]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        EdgeTLError: on_edgetl_error, LookupError: on_lookup, HTTPException: on_http, _TooLarge: on_too_large,
        Exception: on_crash})
    app.state.ctx = ctx
    return Guard(app, settings)


def _item_id(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise DataError("id must be an image id (an integer from GET /api/queue)")
    try:
        value = int(raw)
    except ValueError:
        raise DataError(f"id must be an image id (an integer from GET /api/queue), found {str(raw)[:40]!r}") from None
    if value < 0:
        raise DataError("id must be a positive integer")
    return value


__all__ = ["API", "Context", "Guard", "ServeSettings", "WatcherThread", "create_app", "is_loopback"]
