"""Helpers of the studio tests: small datasets, ``fasttune studio`` in a subprocess, an API client with the page's
CSRF secret.

Imported by name (``from studio_helpers import ...``), as tests/cli's helpers are.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fasttune.quickstart import load_facts

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FASTTUNE_COMPILE": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
REPO = Path(__file__).resolve().parents[2]
ENV["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in ENV.get("PYTHONPATH", "").split(os.pathsep) if p])

# the quickstart's fact table as ShareGPT conversations
FACT_ROWS = [{"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]}
             for r in load_facts()]
SUM_ROWS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(3) for b in range(3)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextlib.contextmanager
def start_studio(runs: Path, roots: list[Path], *extra: str) -> Iterator[str]:
    """``fasttune studio --port 0`` in a subprocess; yields its URL; stops it with Ctrl-C (SIGINT) at the end."""
    args = [sys.executable, "-m", "fasttune.cli", "studio", "--port", "0", "--runs", str(runs), *extra]
    for root in roots:
        args += ["--root", str(root)]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            found = re.search(r"fasttune studio: (http://\S+)", line)
            if found:
                break
        else:
            raise RuntimeError("fasttune studio did not start:\n" + "".join(lines))
        yield found.group(1)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Client:
    """The API as the page calls it: GETs plain, POSTs with the CSRF header read from the page."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        page = urllib.request.urlopen(self.url + "/").read().decode()
        self.csrf = re.search(r'name="csrf" content="([^"]+)"', page).group(1)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"X-Fasttune-Csrf": self.csrf, "Content-Type": "application/json"} if method == "POST" else {}
        hdrs.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=120) as res:
                status, text = res.status, res.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text.decode()

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, body if body is not None else {}, **kw)

    def events(self, path: str, until: str = "end", timeout: float = 120) -> list[tuple[str, Any]]:
        """Read server-sent events from ``path`` until the event ``until`` (inclusive)."""
        got = []
        with urllib.request.urlopen(self.url + path, timeout=timeout) as res:
            name = None
            for raw in res:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    got.append((name, json.loads(line[6:])))
                    if name == until:
                        return got
        return got


def wait_for(condition, timeout: float = 60, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
