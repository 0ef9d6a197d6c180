"""fasttune studio as a person uses it, in a real headless browser (Debian's chromium and chromedriver, driven by
selenium): pick the tiny model, upload a dataset and see the trained tokens highlighted, train SFT and watch the
chart move, train GRPO with built-in rewards, chat (base and fine-tuned side by side), export a GGUF.

Each page's screenshot is written to ``<tmp>/screenshots`` (and to ``$FASTTUNE_STUDIO_SHOTS`` when set: the README's
pictures in docs/studio/ come from there). Skipped, saying why, where chromium, chromedriver or selenium is missing
(scripts/test.sh installs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from studio_helpers import FACT_ROWS, SUM_ROWS, start_studio, write_jsonl

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (scripts/test.sh installs it)")
if not (CHROMIUM and DRIVER):
    pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver; scripts/test.sh does)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture()
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


class Page:
    def __init__(self, driver, shots: Path):
        self.d, self.shots = driver, shots

    def wait(self, condition, timeout=60, what="condition"):
        return WebDriverWait(self.d, timeout, poll_frequency=0.2).until(lambda d: condition(), message=what)

    def id(self, name):
        return self.d.find_element(By.ID, name)

    def css(self, selector):
        return self.d.find_elements(By.CSS_SELECTOR, selector)

    def tab(self, name):
        self.css(f'#tabs button[data-page="{name}"]')[0].click()

    def field(self, container, path, value):
        """Set the schema-generated input of ``path`` inside ``container`` as a person types or picks."""
        node = self.css(f'{container} [data-path="{path}"]')[0]
        if node.tag_name == "select":
            Select(node).select_by_value(value)
        else:
            node.clear()
            node.send_keys(value)

    def click_fresh(self, selector):
        """Click the element ``selector`` finds now; False when the page redrew it meanwhile."""
        try:
            self.css(selector)[0].click()
        except (StaleElementReferenceException, IndexError):
            return False
        return True

    def js(self, script):
        return self.d.execute_script(script)

    def shot(self, name):
        """The whole page (the window grown to the page's height, at most 2400 px), then the window restored."""
        path = self.shots / f"{name}.png"
        height = min(2400, self.js("return document.documentElement.scrollHeight"))
        self.d.set_window_size(1280, max(1000, height))
        time.sleep(0.3)  # the charts redraw at the new size
        self.js("window.dispatchEvent(new Event('resize'))")
        self.d.save_screenshot(str(path))
        self.d.set_window_size(1280, 1000)
        copy = os.environ.get("FASTTUNE_STUDIO_SHOTS")
        if copy:
            Path(copy).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(copy) / path.name)

    def upload(self, path: Path):
        self.id("data-file").send_keys(str(path))
        self.id("data-upload").click()

    def train_until_done(self, timeout=120):
        before = self.id("live-name").text
        self.id("train-start").click()
        self.wait(lambda: self.id("live-name").text not in ("", before), 30, "the new run on the page")
        self.wait(lambda: self.id("live-status").text in ("finished", "failed", "stopped"), timeout, "the run ends")
        log = self.id("live-log").text
        assert self.id("live-status").text == "finished", log[-3000:]


def test_studio_end_to_end(browser, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    chat = write_jsonl(tmp_path / "facts.jsonl", FACT_ROWS)
    sums = write_jsonl(tmp_path / "sums.jsonl", SUM_ROWS)
    runs = tmp_path / "runs"
    with start_studio(runs, [tmp_path]) as url:
        page = Page(browser, shots)
        browser.get(url)
        page.wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", 30, "the page")

        # 1. model: the tiny model, its family, parameters and estimate
        page.id("model-check").click()
        page.wait(lambda: "predicted peak" in page.id("model-info").text, 60, "the model's facts")
        info = page.id("model-info").text
        assert "llama" in info and "family (fast path)" in info and "parameters" in info and "MiB" in info
        page.shot("1-model")

        # 2. data: upload, detected format, the answers highlighted
        page.tab("data")
        page.upload(chat)
        page.wait(lambda: page.css("#data-rows .tok.trained"), 60, "highlighted tokens")
        assert "sharegpt" in page.id("data-summary").text
        first = page.css("#data-rows .datarow")[0]
        trained = "".join(n.text for n in first.find_elements(By.CSS_SELECTOR, ".tok.trained"))
        assert trained == FACT_ROWS[0]["conversations"][1]["value"] + "<|eot_id|>", trained
        untrained = "".join(n.text for n in first.find_elements(By.CSS_SELECTOR, ".tok:not(.trained)"))
        assert FACT_ROWS[0]["conversations"][0]["value"] in untrained
        page.shot("2-data")

        # 3. SFT: start, watch the loss chart grow while it runs, finish
        page.tab("train")
        page.field("#method-row", "train.max_steps", "30")
        page.id("train-start").click()
        page.wait(lambda: page.js("return state.rows.length") >= 2, 90, "the first logged steps")
        seen = page.js("return state.rows.length")
        page.wait(lambda: page.js("return state.rows.length") > seen or page.id("live-status").text == "finished", 60,
                  "more steps on the chart")
        assert page.js("return state.rows.length") > seen, "the chart did not move while the run trained"
        page.wait(lambda: page.id("live-status").text in ("finished", "failed"), 120, "the SFT run ends")
        assert page.id("live-status").text == "finished", page.id("live-log").text[-3000:]
        canvas = page.css('canvas[data-title="loss"]')
        assert canvas, "no loss chart"
        drawn = page.js("const c = document.querySelector('canvas[data-title=\"loss\"]');"
                        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                        "let blue = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 200 && d[i] < 90) blue++;"
                        "return blue;")
        assert drawn > 100, f"the loss curve has {drawn} blue pixels"
        losses = [r["loss"] for r in page.js("return state.rows") if "loss" in r]
        assert len(losses) == 30 and min(losses[-5:]) < losses[0], losses
        sft_run = page.id("live-name").text
        page.shot("3-train-sft")

        # 4. GRPO with two built-in rewards
        page.field("#method-row", "train.method", "grpo")
        page.tab("data")
        page.upload(sums)
        page.wait(lambda: "prompt_only" in page.id("data-summary").text, 60, "the sums preview")
        assert "no token of the row is trained" in page.id("data-summary").text
        page.tab("train")
        for name in ("numeric", "format", "length"):
            page.css(f'#reward-list input[value="{name}"]')[0].click()
        page.field("#method-row", "train.max_steps", "4")
        page.field("#rewards", "rl.max_completion_length", "8")
        page.field("#rewards", "rl.target_length", "30")
        page.field("#method-row", "run.name", "grpo")
        page.wait(lambda: page.id("train-problems").get_attribute("class").find("hidden") >= 0, 10, "a valid recipe")
        page.train_until_done()
        page.wait(lambda: page.css('canvas[data-title="reward per function"]'), 10, "the reward chart")
        rows = page.js("return state.rows")
        keys = set().union(*[r.keys() for r in rows])
        assert {"rewards/numeric_reward/mean", "rewards/format_reward/mean", "rewards/length_reward/mean",
                "kl"} <= keys, keys
        # the random tiny model never writes an answer; the length reward varies within a group, so it learns
        assert all(r["rewards/length_reward/mean"] > 0 for r in rows) and any(r["grad_norm"] > 0 for r in rows), rows
        assert rows[-1]["kl"] > 0, rows  # the policy moved away from the base model (beta 0.1)
        page.shot("4-train-grpo")

        # 5. chat: base and fine-tuned side by side, streamed
        page.tab("chat")
        page.wait(lambda: page.css(f'#chat-run option[value="{sft_run}"]'), 10, "the SFT run in the list")
        Select(page.id("chat-run")).select_by_value(sft_run)
        page.id("chat-prompt").send_keys(FACT_ROWS[0]["conversations"][0]["value"])
        page.id("chat-send").click()
        page.wait(lambda: page.id("chat-send").is_enabled(), 90, "both answers")
        assert not page.id("chat-message").text, page.id("chat-message").text
        answers = {c.get_attribute("data-source"): c.find_elements(By.CSS_SELECTOR, ".turn.assistant .text")[-1].text
                   for c in page.css("#chat-columns .column")}
        assert set(answers) == {"base", "tuned"} and all(answers.values()), answers
        assert answers["base"] != answers["tuned"], answers
        page.shot("5-chat")

        # 6. export a GGUF (and its Modelfile), then the files and sizes
        page.tab("export")
        page.wait(lambda: page.css(f'#export-run option[value="{sft_run}"]'), 10, "the run in the list")
        Select(page.id("export-run")).select_by_value(sft_run)
        page.css('#export-gguf input[value="q8_0"]')[0].click()
        page.id("export-ollama").click()
        page.id("export-start").click()
        page.wait(lambda: page.id("export-message").text in ("done",) or "failed" in page.id("export-message").text,
                  120, "the export")
        assert page.id("export-message").text == "done", page.id("export-log").text[-3000:]
        files = page.id("export-files").text
        assert ".gguf" in files and "Modelfile" in files, files
        gguf = next((runs / sft_run / "gguf").glob("*.gguf"))
        assert gguf.stat().st_size > 100_000
        page.shot("6-export")

        # 6b. the exported GGUF answers through llama.cpp, where it is installed
        if importlib.util.find_spec("llama_cpp") is not None:
            page.tab("chat")
            Select(page.id("chat-run")).select_by_value(sft_run)
            Select(page.id("chat-source")).select_by_value("gguf")
            page.id("chat-reset").click()
            page.id("chat-prompt").send_keys(FACT_ROWS[0]["conversations"][0]["value"])
            page.id("chat-send").click()
            page.wait(lambda: page.id("chat-send").is_enabled(), 60, "the GGUF answer")
            assert not page.id("chat-message").text, page.id("chat-message").text
            gguf_answer = page.css('#chat-columns [data-source="gguf"] .turn.assistant .text')[-1].text
            assert gguf_answer.startswith("The capital of"), (gguf_answer, answers["tuned"])

        # 7. runs: both runs, curves overlaid
        page.tab("runs")
        page.wait(lambda: len(page.css("#runs-table tbody tr")) == 2, 10, "two runs")
        for i in range(2):  # the table is redrawn when the runs list refreshes: find each box afresh
            page.wait(lambda i=i: page.click_fresh(f"#runs-table tbody tr:nth-child({i + 1}) input"), 10, "a run's box")
        page.wait(lambda: page.js("return overlayRuns.size") == 2, 10, "two runs overlaid")
        time.sleep(0.5)
        statuses = [r["status"] for r in page.js("return state.runs")]
        assert statuses == ["finished", "finished"], statuses
        page.wait(lambda: page.click_fresh("#runs-table tbody tr:nth-child(1) button"), 10, "the report button")
        page.wait(lambda: "Status: finished" in page.id("run-report").text, 10, "the report")
        page.shot("7-runs")
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, json.dumps(logs)[:2000]
