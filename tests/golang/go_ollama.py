"""Ollama's prompt rendering by Go's own text/template (the reference for fasttune's Modelfiles; test helper).

``GoOllama.build()`` compiles ``ollama_render.go`` once (Debian's ``golang-go``; scripts/test.sh installs it) into
``$FASTTUNE_CACHE/go`` (or ``~/.cache/fasttune/go``), named by the source's hash, so later sessions reuse it.
``render(cases)`` renders many prompts in one process. See ollama_render.go for what follows Ollama.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from jinja2 import TemplateError

from fasttune.data.encode import encode_chat
from fasttune.data.gotemplate import render_go_template
from fasttune.data.ollama import special_tokens_added

SOURCE = Path(__file__).with_name("ollama_render.go")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"},
     {"role": "assistant", "content": "Rome"}, {"role": "user", "content": "And of Spain?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}],
    [{"role": "system", "content": "Be brief.\nVery brief."}, {"role": "user", "content": "Hi"}],
]


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


def parse_modelfile(text: str) -> dict:
    """A Modelfile's TEMPLATE, SYSTEM ("" when absent), stop strings and FROM."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    stops = [bytes(s, "utf-8").decode("unicode_escape") for s in re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)]
    source = re.search(r"^FROM (.+)$", text, re.M)[1]
    return {"template": template[1], "system": system[1] if system else "", "stops": stops, "from": source}


def ollama_ids(tokenizer, text: str, adds_bos: bool) -> list[int]:
    """The ids llama.cpp feeds for a prompt Ollama rendered: special tokens parsed, the BOS added when the GGUF says."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ([tokenizer.bos_token_id] if adds_bos else []) + ids


def ollama_data(system: str, messages: list[dict]) -> dict:
    """What Ollama's chat handler passes the template (as ollama_render.go builds it, for the Python renderer)."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"], "Thinking": ""})
    return {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"), "Messages": collated,
            "Tools": None, "Response": "", "Think": False, "IsThinkSet": False}


def check_modelfile(go, tokenizer, modelfile: str, conversations=CONVERSATIONS, adds_bos: bool | None = None) -> int:
    """Render each conversation with Go as Ollama would and compare with the training ids; returns cases checked."""
    parsed = parse_modelfile(modelfile)
    if adds_bos is None:
        adds_bos = special_tokens_added(tokenizer)[0]
    cases, wants, conversations_run = [], [], []
    for messages in conversations:
        generation = messages[-1]["role"] != "assistant"
        try:
            want = encode_chat(tokenizer, messages, add_generation_prompt=generation)
        except TemplateError as error:  # a template that refuses system messages: nothing to match
            if messages[0]["role"] == "system" and "system" in str(error).lower():
                continue
            raise
        cases.append({"template": parsed["template"], "system": parsed["system"], "messages": messages})
        wants.append(want)
        conversations_run.append(messages)
    texts = go.render(cases)
    for messages, text, want in zip(conversations_run, texts, wants):
        got = ollama_ids(tokenizer, text, adds_bos)
        assert got == want, (f"Ollama (Go) prompt differs from training for {messages}\n"
                             f" go:       {tokenizer.decode(got)!r}\n training: {tokenizer.decode(want)!r}")
        # fasttune's own Go renderer (used to check templates at export), given the data Ollama builds, agrees
        assert render_go_template(parsed["template"], ollama_data(parsed["system"], messages)) == text
    return len(cases)
