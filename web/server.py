"""The browser server: the page, ``POST /offer``, and the guard in front of them.

``create_app(settings, config)`` builds a FastAPI app and nothing else: its
lifespan loads the models once (or takes a loaded ``Engine``), builds the
``CallManager`` that every browser shares, and hangs up every call on shutdown.
Importing this module starts nothing.

Routes: ``GET /`` the page (web/static), ``GET /config`` the ICE servers for the
page, ``POST /offer`` {sdp, type} -> the answer, ``GET /health`` the session
count. On a non-loopback host every API call needs the token (``Authorization:
Bearer ...``); on any host a browser's Origin must be the server's own (or one
allowed explicitly), and on loopback the Host must be a loopback name (no DNS
rebinding).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.staticfiles import StaticFiles

from agent.config import Config
from agent.engine import Engine
from web.manager import CallManager, IceServer, OfferError
from web.rtc import CallOptions

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = {
    # Everything the page uses comes from this server: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob: mediastream:; "
                               "img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # required unless the host is loopback
    allowed_origins: tuple[str, ...] = ()  # besides the server's own origin
    max_sessions: int = 2
    ice_servers: tuple[IceServer, ...] = ()
    max_sdp_bytes: int = 16384
    max_body_bytes: int = 32768
    call: CallOptions = CallOptions()
    tls: bool = False

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"--host {self.host} makes the server reachable from other machines: "
                             "give a token (--token or DUPLEX_TOKEN)")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"


class Guard:
    """Token, Origin and Host checks for the API routes (the static page is public)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings

    def check(self, request: Request) -> None:
        s = self.settings
        host_header = request.headers.get("host", "")
        hostname = urlsplit(f"//{host_header}").hostname or ""
        if is_loopback(s.host) and not is_loopback(hostname):
            raise HTTPException(403, f"unexpected Host {host_header!r} for a server on {s.host}")
        origin = request.headers.get("origin")
        if origin is not None and origin not in s.allowed_origins and urlsplit(origin).netloc != host_header:
            raise HTTPException(403, f"requests from the origin {origin!r} are not allowed")
        if s.token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {s.token}".encode()):
                raise HTTPException(401, "a valid token is required (Authorization: Bearer TOKEN; "
                                         "open the page as /#token=TOKEN)",
                                    headers={"WWW-Authenticate": "Bearer"})


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object, refusing more than ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise HTTPException(413, f"the request body is larger than {limit} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        raise HTTPException(400, "the body must be JSON: {\"sdp\": \"...\", \"type\": \"offer\"}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sdp"), str) or not isinstance(data.get("type"), str):
        raise HTTPException(400, "the body must be {\"sdp\": string, \"type\": \"offer\"}")
    return data


def create_app(settings: ServerSettings, config: Config | None = None, engine: Engine | None = None,
               on_ready: Callable[[str], None] | None = None) -> FastAPI:
    """The app; models are loaded by its lifespan (from ``config``) unless ``engine`` is given."""
    if engine is None and config is None:
        raise ValueError("create_app needs a Config or a loaded Engine")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = engine is None
        eng = engine or await asyncio.get_running_loop().run_in_executor(None, Engine.load, config)
        manager = CallManager(eng, settings.max_sessions, settings.ice_servers, settings.call, settings.max_sdp_bytes)
        app.state.manager = manager
        if on_ready:
            on_ready(settings.url)
        try:
            yield
        finally:
            await manager.close_all()
            if own:
                eng.close()

    app = FastAPI(title="duplex", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    guard = Guard(settings)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.post("/offer")
    async def offer(request: Request):
        guard.check(request)
        data = await read_json(request, settings.max_body_bytes)
        manager: CallManager = request.app.state.manager
        try:
            answer = await manager.answer(data["sdp"], data["type"])
        except OfferError as e:
            headers = {"Retry-After": "30"} if e.status == 503 else None
            raise HTTPException(e.status, e.message, headers=headers) from None
        return {"sdp": answer.sdp, "type": answer.type}

    @app.get("/config")
    async def page_config(request: Request):
        guard.check(request)
        return {"iceServers": [s.to_json() for s in settings.ice_servers]}

    @app.get("/health")
    async def health(request: Request):
        manager: CallManager = request.app.state.manager
        return {"status": "ok", "sessions": len(manager.calls), "max_sessions": manager.max_sessions}

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


class ServerThread:
    """The app on uvicorn in a thread of this process (tests, ``bench webrtc``).

    The socket is bound and listening before the thread starts, so a client may
    connect at once: its request waits in the backlog until the lifespan is done.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket
        import threading

        import uvicorn

        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="duplex-web-server", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError(f"the web server did not stop within {timeout} s")
