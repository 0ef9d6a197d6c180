"""Ollama's prompt rendering by Go's own text/template (the reference for fasttune's Modelfiles; test helper).

``GoOllama.build()`` compiles ``ollama_render.go`` once (Debian's ``golang-go``; scripts/test.sh installs it) into
``$FASTTUNE_CACHE/go`` (or ``~/.cache/fasttune/go``), named by the source's hash, so later sessions reuse it.
``render(cases)`` renders many prompts in one process. See ollama_render.go for what follows Ollama.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("ollama_render.go")


class GoOllama:
    def __init__(self, binary: Path):
        self.binary = binary

    @classmethod
    def build(cls) -> GoOllama:
        go = shutil.which("go")
        if go is None:
            raise FileNotFoundError("go")
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
        cache = Path(os.environ.get("FASTTUNE_CACHE") or Path.home() / ".cache" / "fasttune").expanduser() / "go"
        binary = cache / f"ollama_render-{digest}"
        if not binary.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            scratch = cache / f".{binary.name}.tmp-{os.getpid()}"
            env = {**os.environ, "GO111MODULE": "off", "CGO_ENABLED": "0"}
            done = subprocess.run([go, "build", "-o", str(scratch), str(SOURCE)], capture_output=True, text=True,
                                  env=env, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"go build {SOURCE} failed: {done.stderr.strip()}")
            os.replace(scratch, binary)
        return cls(binary)

    def render(self, cases: list[dict]) -> list[str]:
        """Each case: {"template", "system" (the Modelfile's SYSTEM), "messages": [{"role", "content"}], ...};
        returns the prompts Ollama would build. A Go error in any case raises, naming the case."""
        done = subprocess.run([str(self.binary)], input=json.dumps(cases), capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{self.binary.name} failed: {done.stderr.strip()}")
        results = json.loads(done.stdout)
        bad = [(i, r["error"]) for i, r in enumerate(results) if "error" in r]
        if bad:
            i, error = bad[0]
            raise ValueError(f"Go's text/template refused case {i} ({len(bad)} of {len(cases)} failed): {error}\n"
                             f"template: {cases[i]['template']!r}")
        return [r["text"] for r in results]
