"""The studio's API: the form is the recipe schema, every problem at once, the safety rules (token, Host, Origin,
CSRF, confined paths, upload limit), the data preview by row, the model's facts, and the run lifecycle across a
restarted server and the CLI (start, refuse a second, stop = checkpoint, resume from the command line, stop again)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from studio_helpers import ENV, FACT_ROWS, Client, wait_for, write_jsonl

from fasttune.cli.estimate import estimate
from fasttune.cli.recipe import all_fields, default_of, load_recipe
from fasttune.studio import Studio, make_server


@contextlib.contextmanager
def serving(studio: Studio):
    server = make_server(studio, 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def studio(tmp_path):
    (tmp_path / "data").mkdir()
    studio = Studio(tmp_path / "runs", [tmp_path / "data"])
    with serving(studio) as url:
        yield Client(url), studio, tmp_path


def _recipe(**sections):
    return {"recipe": {"model": {"max_seq_length": 96, "dtype": "float32"}, "data": {"chat_template": "llama-3"},
                       **sections}}


def test_the_form_is_the_recipe_schema(studio):
    client, _, _ = studio
    status, schema = client.get("/api/schema")
    assert status == 200
    fields = {f["path"]: f for s in schema["sections"] for f in s["fields"]}
    assert list(fields) == [path for path, _ in all_fields()]
    for path, f in all_fields():
        default = default_of(f)
        assert fields[path]["default"] == (list(default) if isinstance(default, tuple) else default), path
        assert fields[path]["help"] == f.metadata["help"]
    assert set(schema["method_formats"]) == {"sft", "pretrain", "dpo", "orpo", "kto", "grpo"}
    assert set(schema["rewards"]) == {"format", "exact", "numeric", "length"}


def test_every_problem_at_once_with_its_field(studio):
    client, _, _ = studio
    status, out = client.post("/api/validate", {"recipe": {"lora": {"r": 0}, "train": {"method": "grpo",
                                                                                       "max_steps": -1}}})
    assert status == 200
    fields = [p["field"] for p in out["problems"]]
    assert "lora.r" in fields and "train.max_steps" in fields and "rl.rewards" in fields, out
    assert client.post("/api/validate", _recipe())[1] == {"problems": []}


def test_state_changes_need_the_pages_secret_and_origin(studio):
    client, _, _ = studio
    assert client.post("/api/validate", {}, headers={"X-Fasttune-Csrf": "guess"})[0] == 403
    status, out = client.post("/api/validate", {}, headers={"Origin": "http://evil.example"})
    assert status == 403 and "Origin" in out["error"]
    assert client.post("/api/validate", {}, headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    status, out = client.get("/api/runs", headers={"Host": "evil.example:80"})  # DNS rebinding
    assert status == 403 and "loopback" in out["error"]
    assert client.post("/api/validate", {})[0] == 200


def test_a_token_guards_every_request(tmp_path):
    assert Studio(tmp_path / "a", [tmp_path], host="0.0.0.0").token  # beyond loopback: a token, always
    assert Studio(tmp_path / "b", [tmp_path]).token is None
    studio = Studio(tmp_path / "runs", [tmp_path], token="s3cret")
    with serving(studio) as url:
        assert _status(url + "/api/runs") == 401
        assert _status(url + "/?token=wrong") == 401
        opener = urllib.request.build_opener(_NoRedirect)
        with contextlib.suppress(urllib.error.HTTPError):
            opener.open(url + "/?token=s3cret")
        cookie = _NoRedirect.last.headers["Set-Cookie"]
        assert cookie.startswith("fasttune_token=s3cret") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        request = urllib.request.Request(url + "/api/runs", headers={"Cookie": cookie.split(";")[0]})
        assert urllib.request.urlopen(request).status == 200
        request = urllib.request.Request(url + "/api/runs", headers={"Authorization": "token s3cret"})
        assert urllib.request.urlopen(request).status == 200


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    last = None

    def http_error_302(self, req, fp, code, msg, headers):
        _NoRedirect.last = fp
        raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)


def _status(url):
    try:
        return urllib.request.urlopen(url).status
    except urllib.error.HTTPError as error:
        return error.code


def test_paths_stay_inside_the_allowed_roots(studio):
    client, _, tmp = studio
    (tmp / "data" / "link").symlink_to("/etc")
    (tmp / "data" / "rows.jsonl").write_text("{}\n")
    status, out = client.get("/api/files?path=/etc")
    assert status == 403 and "outside the folders" in out["error"]
    assert client.get(f"/api/files?path={tmp}/data/../data")[0] == 403
    assert client.get(f"/api/files?path={tmp}/data/link")[0] == 403  # the symlink resolves outside
    status, out = client.get(f"/api/files?path={tmp}/data")
    assert status == 200 and [e["name"] for e in out["entries"]] == ["link", "rows.jsonl"]
    status, out = client.post("/api/preview", _recipe(data={"path": "/etc/hostname.jsonl", "chat_template": "llama-3"}))
    assert status in (400, 403), out  # 400: does not exist; never read
    write_jsonl(tmp / "outside.jsonl", FACT_ROWS)
    status, out = client.post("/api/preview", _recipe(data={"path": str(tmp / "outside.jsonl"), "chat_template": "llama-3"}))
    assert status == 403 and out["error"].startswith("data.path:"), out


def test_uploads_are_limited_and_previewed_by_row(studio):
    client, server, _ = studio
    rows = FACT_ROWS[:3] + [{"conversations": [{"from": "human", "value": "no answer here"}]}]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    assert client.post("/api/upload?name=evil.sh", raw=body)[0] == 400
    server.max_upload_bytes = 100
    status, out = client.post("/api/upload?name=rows.jsonl", raw=body)
    assert status == 400 and "over the limit" in out["error"]
    server.max_upload_bytes = 2**20
    status, out = client.post("/api/upload?name=../rows.jsonl", raw=body)
    assert status == 201 and Path(out["path"]).parent == server.uploads
    status, shown = client.post("/api/preview", _recipe(data={"path": out["path"], "chat_template": "llama-3"}))
    assert status == 200 and shown["format"] == "sharegpt" and shown["total_rows"] == 4
    assert [p["row"] for p in shown["problems"]] == [3] and "assistant" in shown["problems"][0]["problem"]
    trained = "".join(t for t, on in shown["rows"][0]["tokens"] if on)
    assert trained == FACT_ROWS[0]["conversations"][1]["value"] + "<|eot_id|>"


def test_model_facts_and_estimate(studio):
    client, _, _ = studio
    status, info = client.post("/api/model", _recipe())
    assert status == 200 and info["family"] == "llama" and info["fast_path"]
    recipe = load_recipe(None, ["--model.max_seq_length", "96", "--model.dtype", "float32"])
    predicted = estimate(recipe, baseline=info["estimate"]["baseline"])
    assert info["parameters"] == predicted["params"] and info["estimate"]["total"] == predicted["total"]
    status, out = client.post("/api/model", _recipe(model={"name": "tiny-nothing"}))
    assert status == 400 and out["problems"][0]["field"] == "model.name"


def _run_status(client, name):
    return next(r for r in client.get("/api/runs")[1]["runs"] if r["name"] == name)


@pytest.mark.slow
def test_run_outlives_the_server_stops_with_a_checkpoint_and_resumes_from_the_cli(tmp_path, monkeypatch):
    for key in ("OMP_NUM_THREADS", "FASTTUNE_COMPILE", "HF_HUB_OFFLINE", "PYTHONPATH"):  # what the runs inherit
        monkeypatch.setenv(key, ENV[key])
    (tmp_path / "data").mkdir()
    runs = tmp_path / "runs"
    recipe = _recipe(train={"max_steps": 400, "batch_size": 2, "gradient_accumulation_steps": 1, "save_steps": 0},
                     lora={"r": 4}, run={"name": "long"})
    first = Studio(runs, [tmp_path / "data"])
    with serving(first) as url:
        client = Client(url)
        status, started = client.post("/api/runs", recipe)
        assert status == 201, started
        name = started["name"]
        status, out = client.post("/api/runs", recipe)
        assert status == 409 and name in out["error"] and "one run at a time" in out["error"]
        events = client.events(f"/api/runs/{name}/events", until="metrics")
        assert events[-1][0] == "metrics" and events[-1][1][0]["step"] >= 1
    # a new server on the same runs folder: the run kept training without the first one
    with serving(Studio(runs, [tmp_path / "data"])) as url:
        client = Client(url)
        assert _run_status(client, name)["status"] == "running"
        assert client.get("/api/runs")[1]["running"]["name"] == name
        assert client.post(f"/api/runs/{name}/stop")[0] == 200
        wait_for(lambda: _run_status(client, name)["status"] == "stopped", 60, "the stopped run")
        info = _run_status(client, name)
        assert info["checkpoints"], info
        stopped_at = int(info["checkpoints"][-1].split("-")[-1])
        assert "interrupted" in client.get(f"/api/runs/{name}/report")[1]
        # the CLI resumes the studio's run; the studio sees it train, and stops it again
        cli = subprocess.Popen([sys.executable, "-m", "fasttune.cli", "train", str(runs / name / "recipe.yaml"),
                                "--resume", str(runs / name), "--quiet"], env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: _run_status(client, name)["status"] == "running", 60, "the resumed run")
            status, detail = client.get(f"/api/runs/{name}")
            wait_for(lambda: client.get(f"/api/runs/{name}")[1]["step"] > stopped_at, 60, "steps after the checkpoint")
            assert client.post(f"/api/runs/{name}/stop")[0] == 200
            out, _ = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
        assert cli.returncode == 130 and f"resuming from checkpoint-{stopped_at}" in out, out[-2000:]
        assert _run_status(client, name)["status"] == "stopped"
        steps = [r["step"] for r in client.get(f"/api/runs/{name}")[1]["metrics"]]
        assert steps == list(range(1, len(steps) + 1)), steps  # the resumed log continues the first one
