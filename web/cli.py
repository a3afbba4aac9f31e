"""Commands of the browser server: ``serve``, and ``bench webrtc`` (``add_arguments``
and ``main``, dispatched by run_agent.py's bench table).

``register(subparsers)`` adds ``serve`` to run_agent.py's parser. Importing this
module is cheap: aiortc, FastAPI and the models load only when a command runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from agent.config import add_config_flags, config_from_args


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def register(subparsers) -> None:
    s = subparsers.add_parser("serve", help="voice chat in the browser over WebRTC (the main job)")
    s.add_argument("--host", default=os.environ.get("DUPLEX_HOST", "127.0.0.1"),
                   help="interface to listen on (default 127.0.0.1; any other needs a token)")
    s.add_argument("--port", type=int, default=_env_int("DUPLEX_PORT", 8000))
    s.add_argument("--token", default=os.environ.get("DUPLEX_TOKEN"),
                   help="token required by the API (env DUPLEX_TOKEN); required unless the host is loopback")
    s.add_argument("--allow-origin", action="append", default=_csv(os.environ.get("DUPLEX_ALLOW_ORIGINS")),
                   help="another origin allowed to call the API (repeatable; env DUPLEX_ALLOW_ORIGINS, comma-separated)")
    s.add_argument("--max-sessions", type=int, default=_env_int("DUPLEX_MAX_SESSIONS", 2),
                   help="concurrent voice sessions; more are answered 503 (default 2)")
    s.add_argument("--ice-server", action="append", default=_csv(os.environ.get("DUPLEX_ICE_SERVERS")),
                   help="STUN/TURN URL, e.g. stun:stun.example.org:3478 (repeatable; env DUPLEX_ICE_SERVERS)")
    s.add_argument("--turn-username", default=os.environ.get("DUPLEX_TURN_USERNAME"))
    s.add_argument("--turn-credential", default=os.environ.get("DUPLEX_TURN_CREDENTIAL"))
    s.add_argument("--jitter-ms", type=int, default=_env_int("DUPLEX_JITTER_MS", 40),
                   help="the user's audio is placed this much after it arrives, against network jitter "
                        "(default 40; a path slower than that moves it later for the rest of the call)")
    s.add_argument("--ssl-certfile", help="serve HTTPS (browsers allow the microphone only on HTTPS or localhost)")
    s.add_argument("--ssl-keyfile")
    add_config_flags(s)
    s.set_defaults(func=cmd_serve)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bench webrtc`` (run_agent.py adds the engine flags)."""
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--url", help="a running server (default: start one in this process)")
    parser.add_argument("--token", default=os.environ.get("DUPLEX_TOKEN"))
    parser.add_argument("--out", help="write the summary JSON here too")


def settings_from_args(args: argparse.Namespace):
    from web.manager import IceServer
    from web.rtc import CallOptions
    from web.server import ServerSettings

    ice = tuple(IceServer(url, args.turn_username, args.turn_credential) if url.startswith("turn")
                else IceServer(url) for url in args.ice_server)
    return ServerSettings(host=args.host, port=args.port, token=args.token, allowed_origins=tuple(args.allow_origin),
                          max_sessions=args.max_sessions, ice_servers=ice, tls=bool(args.ssl_certfile),
                          call=CallOptions(jitter_ms=args.jitter_ms))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from web.server import create_app

    settings = settings_from_args(args)  # refuses a public host without a token
    config = config_from_args(args)
    link = lambda url: url + (f"#token={settings.token}" if settings.token else "")  # noqa: E731
    print(f"duplex: loading the models, then serving the voice chat on {settings.url}", file=sys.stderr)
    app = create_app(settings, config, on_ready=lambda url: print(f"duplex: ready: open {link(url)} in a browser",
                                                                  file=sys.stderr, flush=True))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return 0


def main(args: argparse.Namespace, config, machine: str) -> int:
    """``bench webrtc``: latencies measured at a WebRTC client over loopback."""
    from web.bench import bench_webrtc

    logging.getLogger("aioice").setLevel(logging.WARNING)
    print(f"bench webrtc on {machine}", file=sys.stderr)
    if args.url:
        summary = asyncio.run(bench_webrtc(args.url, args.rounds, args.token))
    else:
        from agent.engine import Engine
        from web.server import ServerSettings, ServerThread, create_app

        engine = Engine.load(config)
        server = ServerThread(create_app(ServerSettings(max_sessions=2), engine=engine))  # one more: the last call may still be closing
        try:
            summary = asyncio.run(bench_webrtc(server.url, args.rounds))
        finally:
            server.stop()
            engine.close()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0
