"""The studio's HTTP server: the standard library's ``ThreadingHTTPServer``, a JSON API, server-sent events for live
runs and streamed chat, and the static page (``static/``).

Safety (README "Studio"):

* **Bind**: 127.0.0.1 by default. Any other host needs a token (printed at start, as Jupyter does; ``--token`` sets
  it), checked on every request: ``?token=`` once (the answer sets an HttpOnly, SameSite=Strict cookie), the cookie
  or an ``Authorization: token ...`` header afterwards.
* **Host**: on a loopback bind the ``Host`` header must name a loopback address (no DNS rebinding).
* **Forged requests**: every request that changes state is a POST carrying ``X-Fasttune-Csrf``, a per-server secret
  the page reads from its own HTML (another site can neither read it nor set the header without a CORS preflight,
  which this server never grants); a POST whose ``Origin`` is not this server, or that the browser marks
  ``Sec-Fetch-Site: cross-site``, is refused.
* **Files**: paths (file picker, model folder, dataset, reward file) must resolve, symlinks followed, inside the
  roots given with ``--root`` (default: the current folder), the runs folder or the upload folder; ``..`` is refused.
* **Uploads**: at most ``--max-upload-mb`` (default 512), data suffixes only, written into the upload folder.
* **Reward files** run only in the training process of a recipe that names one (``rl.reward_file``).
* **One run at a time**: a second start while one trains is refused (409) naming the run that trains.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import time
import traceback
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from fasttune.cli.recipe import METHOD_FORMATS, RecipeError
from fasttune.cli.report import METRICS, REPORT
from fasttune.config import ConfigError

from . import api
from .chat import ChatError, Chats
from .preview import preview
from .runs import LOG_FILE, BusyError, Runs, metrics_since, tail

UPLOAD_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")
PICKER_SUFFIXES: tuple[str, ...] = UPLOAD_SUFFIXES + (".gguf", ".py", ".yaml")
STATIC_TYPES: dict[str, str] = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
COOKIE = "fasttune_token"
CSRF_HEADER = "X-Fasttune-Csrf"


class Forbidden(PermissionError):
    """A path outside the allowed roots, a missing token, a forged request."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Studio:
    """The server's state: its secrets, roots, run folders and loaded chat model."""

    def __init__(self, runs: Path, roots: list[Path], host: str = "127.0.0.1", token: str | None = None,
                 max_upload_bytes: int = 512 * 2**20):
        self.host = host
        self.runs = Runs(runs.expanduser().resolve())
        self.uploads = self.runs.root / ".studio" / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.roots = [r.expanduser().resolve() for r in roots] + [self.runs.root]
        self.token = token if token is not None else (None if is_loopback(host) else secrets.token_urlsafe(24))
        self.csrf = secrets.token_urlsafe(24)
        self.max_upload_bytes = max_upload_bytes
        self.chats = Chats()

    def allowed(self, value: str, must_exist: bool = True) -> Path:
        """``value`` as a resolved path inside an allowed root, or Forbidden naming the roots."""
        raw = Path(value).expanduser()
        if ".." in raw.parts:
            raise Forbidden(f"path: {value!r} is not allowed; allowed: a path without '..' inside "
                            + ", ".join(map(str, self.roots)))
        path = raw.resolve()
        if not any(path == root or path.is_relative_to(root) for root in self.roots):
            raise Forbidden(f"path: {value!r} ({path}) is outside the folders this studio may read; allowed: inside "
                            + ", ".join(map(str, self.roots)) + " (start it with --root DIR to add one)")
        if must_exist and not path.exists():
            raise FileNotFoundError(f"path: {value!r} does not exist")
        return path

    def confine(self, recipe: Any) -> None:
        for field, value in api.local_paths(recipe):
            try:
                self.allowed(value, must_exist=False)
            except Forbidden as error:
                raise Forbidden(f"{field}: {error}") from None

    def list_folder(self, value: str | None) -> dict[str, Any]:
        if not value:
            return {"path": None, "parent": None, "entries": [{"name": str(r), "path": str(r), "dir": True}
                                                             for r in self.roots]}
        path = self.allowed(value)
        if not path.is_dir():
            raise ConfigError(f"path: {value!r} is not a folder")
        entries = []
        for child in sorted(path.iterdir(), key=lambda p: (not p.is_dir(), p.name.lower())):
            if child.name.startswith("."):
                continue
            if child.is_dir() or child.suffix in PICKER_SUFFIXES:
                entries.append({"name": child.name, "path": str(child), "dir": child.is_dir(),
                                "bytes": child.stat().st_size if child.is_file() else None,
                                "model": (child / "config.json").is_file()})
        parent = path.parent if any(path.parent.is_relative_to(r) for r in self.roots) and path not in self.roots \
            else None
        return {"path": str(path), "parent": str(parent) if parent else None, "entries": entries}


class Handler(BaseHTTPRequestHandler):
    server_version = "fasttune-studio"
    studio: Studio  # set by make_server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal shows the URL and errors only
        pass

    # ---- answers ------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status: int, message: str, **extra: Any) -> None:
        self._json({"error": message, **extra}, status)

    def _sse_start(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _event(self, name: str, data: Any) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    # ---- checks on every request --------------------------------------------------------------------------------
    def _url(self) -> Any:
        return urlparse(self.path)

    def _query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self._url().query).items()}

    def _check_host(self) -> None:
        host = urlparse("//" + (self.headers.get("Host") or "")).hostname or ""
        if is_loopback(self.studio.host) and not is_loopback(host):
            raise Forbidden(f"Host: {self.headers.get('Host')!r} is not allowed; this studio listens on loopback only "
                            "(a page on another site reached it by DNS rebinding?)")

    def _token_ok(self) -> bool:
        token = self.studio.token
        if token is None:
            return True
        given = self._query().get("token")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("token "):
            given = given or auth[6:]
        cookie = SimpleCookie(self.headers.get("Cookie") or "").get(COOKIE)
        candidates = [v for v in (given, cookie.value if cookie else None) if v]
        return any(hmac.compare_digest(v.encode(), token.encode()) for v in candidates)

    def _check_post(self) -> None:
        if self.headers.get("Sec-Fetch-Site") == "cross-site":
            raise Forbidden("request: sent from another site (Sec-Fetch-Site: cross-site); refused")
        origin = self.headers.get("Origin")
        if origin is not None and urlparse(origin).netloc != self.headers.get("Host"):
            raise Forbidden(f"Origin: {origin!r} is not this studio ({self.headers.get('Host')}); refused")
        given = self.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.studio.csrf.encode()):
            raise Forbidden(f"{CSRF_HEADER}: missing or wrong; state-changing requests come from the studio's own page")

    def _guarded(self, method: str) -> None:
        try:
            self._check_host()
            if not self._token_ok():
                return self._send(401, b"fasttune studio: this server needs its token; open the URL printed when it "
                                       b"started (http://HOST:PORT/?token=...)\n", "text/plain; charset=utf-8")
            if method == "POST":
                self._check_post()
            (self._post if method == "POST" else self._get)()
        except Forbidden as error:
            self._error(403, str(error))
        except RecipeError as error:
            self._error(400, str(error), problems=[{"field": api._field_of(p), "problem": p} for p in error.problems])
        except (ConfigError, ChatError, FileNotFoundError) as error:
            self._error(400, str(error))
        except KeyError as error:
            self._error(404, str(error.args[0]) if error.args else "not found")
        except BusyError as error:
            self._error(409, str(error))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except OSError as error:  # a model or dataset that cannot be read (a Hub id offline, a missing file)
            self._error(400, f"{type(error).__name__}: {error}")
        except Exception as error:  # reported to the page and the terminal; the server keeps serving
            traceback.print_exc()
            self._error(500, f"{type(error).__name__}: {error}")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._guarded("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._guarded("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._guarded("POST")

    # ---- GET ----------------------------------------------------------------------------------------------------
    def _get(self) -> None:
        url, q = self._url(), self._query()
        parts = [unquote(p) for p in url.path.split("/") if p]
        if not parts or parts == ["index.html"]:
            if self.studio.token and "token" in q:  # the first visit: keep the token in a cookie, clean the URL
                return self._send(302, b"", "text/plain", {"Location": "/", "Set-Cookie": f"{COOKIE}={q['token']}; "
                                                           "HttpOnly; SameSite=Strict; Path=/"})
            page = _static("index.html").decode().replace("{{CSRF}}", self.studio.csrf)
            return self._send(200, page.encode(), STATIC_TYPES[".html"],
                              {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"})
        if parts[0] == "static" and len(parts) == 2:
            suffix = Path(parts[1]).suffix
            if suffix not in STATIC_TYPES:
                raise KeyError(f"static: {parts[1]!r} not found")
            return self._send(200, _static(parts[1]), STATIC_TYPES[suffix])
        if parts[0] != "api" or len(parts) < 2:
            raise KeyError(f"{url.path!r} not found")
        route = parts[1:]
        if route == ["schema"]:
            return self._json(api.schema())
        if route == ["files"]:
            return self._json(self.studio.list_folder(q.get("path")))
        if route == ["runs"]:
            return self._json({"runs": self.studio.runs.list(), "running": self.studio.runs.running()})
        if route[0] == "runs" and len(route) >= 2:
            run = self.studio.runs.folder(route[1])
            what = route[2] if len(route) > 2 else ""
            if what == "":
                from .runs import run_info

                info = run_info(run, self.studio.runs.alive(run.name))
                metrics, _ = metrics_since(run, 0)
                log, _ = tail(run / LOG_FILE, 0)
                return self._json({**info, "metrics": metrics, "log": log[-20000:]})
            if what == "events":
                return self._run_events(run)
            if what == "report":
                report = run / REPORT
                return self._send(200, report.read_bytes() if report.is_file() else b"(no report yet: the run writes "
                                  b"report.md when it ends)", "text/markdown; charset=utf-8")
            if what == "recipe":
                return self._send(200, (run / "recipe.yaml").read_bytes(), "application/x-yaml",
                                  {"Content-Disposition": f'attachment; filename="{run.name}.yaml"'})
            if what == "export":
                return self._json(self.studio.runs.export_state(run.name))
        raise KeyError(f"{url.path!r} not found")

    def _run_events(self, run: Path) -> None:
        """Server-sent events of one run until it ends: ``metrics`` (new metrics.jsonl rows), ``log`` (new log
        text), ``status``, then ``end``. A resumed run's metrics file is rewritten: ``reset`` says start over."""
        from .runs import run_status

        self._sse_start()
        m_offset = l_offset = 0
        last_status, last_write = None, time.monotonic()
        while True:
            size = (run / METRICS).stat().st_size if (run / METRICS).is_file() else 0
            if size < m_offset:
                m_offset = 0
                self._event("reset", {})
            rows, m_offset = metrics_since(run, m_offset)
            text, l_offset = tail(run / LOG_FILE, l_offset)
            status = run_status(run, self.studio.runs.alive(run.name))
            if rows:
                self._event("metrics", rows)
            if text:
                self._event("log", text)
            if status != last_status:
                self._event("status", status)
                last_status = status
            if status not in ("running", "starting") and not rows and not text:
                self._event("end", status)
                return
            if rows or text:
                last_write = time.monotonic()
            elif time.monotonic() - last_write > 15:  # a comment line: a closed tab ends this thread here
                self.wfile.write(b": still here\n\n")
                self.wfile.flush()
                last_write = time.monotonic()
            time.sleep(0.4)

    # ---- POST ---------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ConfigError("Content-Length: missing; allowed: a request with a body of known length")
        if int(length) > self.studio.max_upload_bytes:
            raise ConfigError(f"upload: {int(length)} bytes is over the limit; allowed: at most "
                              f"{self.studio.max_upload_bytes} bytes (start the studio with --max-upload-mb N)")
        return self.rfile.read(int(length))

    def _payload(self) -> dict[str, Any]:
        body = self._body()
        try:
            value = json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise ConfigError(f"body: not JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise ConfigError("body: allowed: a JSON object")
        return value

    def _recipe(self, payload: dict[str, Any]) -> Any:
        recipe, problems = api.check_recipe(payload.get("recipe"))
        if problems:
            raise RecipeError([p["problem"] for p in problems], "studio")
        self.studio.confine(recipe)
        return recipe

    def _post(self) -> None:
        parts = [unquote(p) for p in self._url().path.split("/") if p]
        route = parts[1:] if parts[:1] == ["api"] else None
        if route == ["upload"]:
            return self._upload()
        if route is None:
            raise KeyError(f"{self.path!r} not found")
        payload = self._payload()
        if route == ["validate"]:
            recipe, problems = api.check_recipe(payload.get("recipe"))
            if recipe is not None:
                try:
                    self.studio.confine(recipe)
                except Forbidden as error:
                    problems = [{"field": str(error).split(":")[0], "problem": str(error)}]
            return self._json({"problems": problems})
        if route == ["model"]:
            return self._json(api.model_info(self._recipe(payload)))
        if route == ["preview"]:  # only what the preview reads must be valid (the rest may still be in progress)
            raw = payload.get("recipe") if isinstance(payload.get("recipe"), dict) else {}
            train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
            method = train.get("method", "sft")
            if method not in METHOD_FORMATS:
                raise ConfigError(f"train.method: {method!r} is not allowed; allowed: {', '.join(METHOD_FORMATS)}")
            recipe = self._recipe({"recipe": {"model": raw.get("model"), "data": raw.get("data")}})
            recipe.train.method = method
            return self._json(preview(recipe, api.tokenizer_for(recipe), int(payload.get("start", 0)),
                                      int(payload.get("count", 8))))
        if route == ["runs"]:
            run = self.studio.runs.start(self._recipe(payload))
            return self._json({"name": run.name, "path": str(run)}, 201)
        if route[0] == "runs" and len(route) == 3:
            name, action = route[1], route[2]
            if action == "stop":
                return self._json({"stopping": name, "pid": self.studio.runs.stop(name)})
            if action == "resume":
                return self._json({"name": self.studio.runs.resume(name).name})
            if action == "export":
                gguf = [str(g).lower() for g in payload.get("gguf", [])]
                bad = [g for g in gguf if g not in api.GGUF_TYPES]
                if bad:
                    raise ConfigError(f"gguf: {bad[0]!r} is not allowed; allowed: {', '.join(api.GGUF_TYPES)}")
                if payload.get("ollama") and not gguf:
                    raise ConfigError("ollama: a Modelfile points at a GGUF file; allowed only with a GGUF type")
                kinds = (payload.get("adapter"), payload.get("merged"), gguf)
                if not any(kinds):
                    raise ConfigError("export: nothing asked; allowed: adapter, merged, GGUF types, ollama")
                child = self.studio.runs.export(name, bool(payload.get("adapter")), bool(payload.get("merged")), gguf,
                                                bool(payload.get("ollama")))
                return self._json({"exporting": name, "pid": child.pid}, 202)
        if route == ["chat"]:
            return self._chat(payload)
        raise KeyError(f"{self.path!r} not found")

    def _upload(self) -> None:
        name = Path(self._query().get("name", "")).name
        if not name or Path(name).suffix.lower() not in UPLOAD_SUFFIXES or name.startswith("."):
            raise ConfigError(f"name: {name!r} is not allowed; allowed: a file name ending in "
                              f"{', '.join(UPLOAD_SUFFIXES)}")
        body = self._body()
        from fasttune.export.atomic import atomic_file

        target = self.studio.uploads / name
        with atomic_file(target) as scratch:
            scratch.write_bytes(body)
        self._json({"path": str(target), "bytes": len(body)}, 201)

    def _chat(self, payload: dict[str, Any]) -> None:
        run = self.studio.runs.folder(str(payload.get("run", "")))
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                                "assistant")
                for m in messages):
            raise ConfigError("messages: allowed: a list of {role: system|user|assistant, content: text}")
        pieces = self.studio.chats.stream(run, str(payload.get("source", "tuned")), messages,
                                          int(payload.get("max_new_tokens", 128)),
                                          float(payload.get("temperature", 0.0)))
        first = next(pieces, None)  # errors before the first token still get a JSON answer
        self._sse_start()
        start, count = time.perf_counter(), 0
        try:
            for piece in ([first] if first is not None else []):
                count += 1
                self._event("token", piece)
            for piece in pieces:
                count += 1
                self._event("token", piece)
        except (ChatError, ValueError, RuntimeError) as error:
            self._event("error", str(error))
        self._event("end", {"pieces": count, "seconds": time.perf_counter() - start})


def _static(name: str) -> bytes:
    return resources.files("fasttune.studio").joinpath("static", name).read_bytes()


def make_server(studio: Studio, port: int) -> ThreadingHTTPServer:
    handler = type("StudioHandler", (Handler,), {"studio": studio})
    server = ThreadingHTTPServer((studio.host, port), handler)
    server.daemon_threads = True
    return server
