"""`banklora studio` over HTTP as the page uses it: a real server process on the tiny Gemma, real
training, compare and export runs as the processes the server owns, the key on every endpoint,
uploads checked before they are kept, paths held inside the workspace, the queue, stop and
resume, a restart during a run, and an adapter served the moment its run ends."""

from __future__ import annotations

import http.client
import io
import os
import json
import re
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_serve import KEY, Server

from banklora.studio.workspace import UPLOAD_LIMIT, OutsideWorkspace, Workspace

FAST = {"batch_size": 2, "report_to": "none", "turn_end_budget": 0, "dtype": "fp32", "augment": 0}  # exact resumes; no check generation; the pairs as written (the step counts below)


def _studio(workspace: Path, tiny_base: Path) -> Server:
    return Server(["--workspace", str(workspace), "--base-model", str(tiny_base)], command="studio")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_base):
    s = _studio(tmp_path_factory.mktemp("studio"), tiny_base)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def upload(studio, small_data) -> str:
    status, body, _ = studio.post(f"/studio/api/data?filename={small_data.name}", small_data.read_bytes())
    assert status == 201, body
    return json.loads(body)["name"]


def _json(response) -> dict:
    status, body, _ = response
    return {"status": status, **json.loads(body)}


def _submit(server: Server, payload: dict) -> dict:
    out = _json(server.post("/studio/api/jobs", payload))
    assert out["status"] == 201, out
    return out


def _train(server: Server, name: str, data: str, **settings) -> dict:
    return _submit(server, {"kind": "train", "name": name, "settings": {"data": [data], **FAST, **settings}})


def _wait(server: Server, job_id: str, until, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _json(server.get(f"/studio/api/jobs/{job_id}"))
        if until(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")


def _ended(server: Server, job_id: str, timeout: float = 240) -> dict:
    return _wait(server, job_id, lambda j: j["state"] not in ("queued", "running"), timeout)


def _stepped(server: Server, job_id: str, step: int) -> dict:
    return _wait(server, job_id, lambda j: (j["progress"] or {}).get("step", 0) >= step or j["state"] not in ("queued", "running"))


def _events(server: Server, job_id: str) -> list[dict]:
    status, body, headers = server.get(f"/studio/api/jobs/{job_id}/events")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    return [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]


# ------------------------------------------------------------------ security
def test_every_job_data_and_file_endpoint_needs_the_key_but_the_page_does_not(studio):
    calls = [("GET", "/studio/api/info"), ("GET", "/studio/api/data"), ("POST", "/studio/api/data?filename=a.jsonl"),
             ("GET", "/studio/api/data/banking"), ("GET", "/studio/api/settings"), ("GET", "/studio/api/jobs"),
             ("POST", "/studio/api/jobs"), ("GET", "/studio/api/jobs/j-0001/events"), ("POST", "/studio/api/jobs/j-0001/stop"),
             ("GET", "/studio/api/adapters"), ("GET", "/studio/files/reports/x.html")]
    for method, path in calls:
        for key in (None, "wrong-key"):
            status, body, _ = studio.request(method, path, b"{}" if method == "POST" else None, key=key)
            assert status == 401, (method, path, key, body)
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
    status, page, _ = studio.get("/studio", key=None)
    assert status == 200 and "banklora studio" in page
    assert re.search(r"""(src|href)=["']?(https?:)?//""", page) is None  # nothing from a CDN: the page works offline


def test_workspace_paths_stay_inside(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    (ws.reports / "r.html").write_text("ok")
    assert ws.resolve("reports/r.html") == ws.reports / "r.html"
    (tmp_path / "secret.txt").write_text("secret")
    (ws.reports / "link").symlink_to(tmp_path / "secret.txt")
    for bad in ("../secret.txt", "reports/../../secret.txt", "/etc/passwd", "reports//r.html", "reports/link", "C:/x", ""):
        with pytest.raises(OutsideWorkspace):
            ws.resolve(bad)


def test_files_outside_the_workspace_are_never_served(studio, tmp_path):
    root = Path(_json(studio.get("/studio/api/info"))["workspace"])
    (tmp_path / "secret.txt").write_text("THE-BANKS-SECRET")
    (root / "reports" / "escape.html").symlink_to(tmp_path / "secret.txt")
    for path in ("reports/escape.html", "reports/../../secret.txt", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd", "..%2f..%2fetc%2fpasswd",
                 "jobs/j-0001.json", "data/" + "x" * 8):
        status, body, _ = studio.get(f"/studio/files/{path}")
        assert status in (400, 404) and "THE-BANKS-SECRET" not in body and "root:" not in body, (path, status, body)
        assert json.loads(body)["error"]["message"]
    status, body, _ = studio.get("/studio/api/data/..%2F..%2Fetc%2Fpasswd")
    assert status in (400, 404) and "root:" not in body
    bad_name = _json(studio.post("/studio/api/jobs", {"kind": "train", "name": "../../escape", "settings": FAST}))
    assert bad_name["status"] == 400 and bad_name["error"]["param"] == "name"


def test_requests_from_other_web_sites_are_refused(studio):
    """A page elsewhere can POST to 127.0.0.1 without a preflight, and a DNS name it points here
    reads as same-origin to the browser: both are refused, even before the key is checked."""
    def call(method, path, headers, body=None):
        request = urllib.request.Request(studio.url + path, data=body, method=method,
                                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain", **headers})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    job = b'{"kind": "train", "name": "from-elsewhere", "settings": {}}'
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        status, body = call("POST", "/studio/api/jobs", headers, job)
        assert status == 403 and body["error"]["code"] == "cross_site_request", body
    status, body = call("GET", "/studio/api/jobs", {"Host": f"rebound.example:{studio.port}"})
    assert status == 403 and body["error"]["code"] == "host_not_allowed"
    assert call("GET", "/studio/api/jobs", {"Host": f"localhost:{studio.port}"})[0] == 200
    assert call("POST", "/studio/api/jobs", {"Origin": studio.url, "Sec-Fetch-Site": "same-origin"}, b"{}")[0] == 400  # its own page
    assert "from-elsewhere" not in {j["name"] for j in _json(studio.get("/studio/api/jobs"))["jobs"]}


def test_malformed_job_requests_are_400s_never_500s(studio, upload):
    for payload in ({"kind": "train", "name": 5}, {"kind": "train", "name": "abc\n"}, {"kind": "train", "name": "ok", "settings": "x"},
                    {"kind": "train", "name": "ok", "settings": {"data": [{"a": 1}]}}, {"kind": "train", "name": "ok", "settings": {"data": 5}},
                    {"kind": "train", "name": "ok", "settings": {"lora.target_modules": [{"a": 1}]}},
                    {"kind": "train", "name": "ok", "settings": {"epochs": [1]}}, {"kind": "compare", "adapters": [{"a": 1}]},
                    {"kind": "compare", "adapters": "x"}, {"kind": "export", "adapter": ["a"]}, {"kind": "nope"}, [1, 2]):
        out = _json(studio.post("/studio/api/jobs", payload))
        assert out["status"] == 400 and out["error"]["type"] == "invalid_request_error", (payload, out)
    assert _json(studio.post("/studio/api/jobs", b"[" * 50_000))["status"] == 400  # nested past the parser's recursion
    assert _json(studio.post("/studio/api/jobs", b" " * 100_000))["status"] == 413
    assert _json(studio.post("/studio/api/jobs/j-9999/stop", {}))["status"] == 404
    assert _json(studio.get("/studio/files/reports/a%00b"))["status"] == 400
    assert _json(studio.get("/studio/files/reports/" + "x" * 300))["status"] in (400, 404)


# ------------------------------------------------------------------ data
def _oversized_upload(server: Server, chunked: bool) -> tuple[int, str]:
    """POST UPLOAD_LIMIT + 1 MiB, stopping when the server has answered (it closes the connection)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.putrequest("POST", "/studio/api/data?filename=big.jsonl")
    connection.putheader("Authorization", f"Bearer {KEY}")
    size = UPLOAD_LIMIT + 2**20
    connection.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size))))
    connection.endheaders()
    piece = b"x" * 2**16
    try:
        for _ in range(size // len(piece)):
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before the end: the answer is waiting
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    return response.status, body


def test_an_upload_with_a_bad_line_names_it_and_nothing_is_kept(studio):
    root = Path(_json(studio.get("/studio/api/info"))["workspace"])
    before = sorted(p.name for p in (root / "data").iterdir())
    lines = [json.dumps({"instruction": "开户需要什么？", "output": "身份证。"}, ensure_ascii=False), json.dumps({"instruction": "只有问题"})]
    bad = _json(studio.post("/studio/api/data?filename=mine.jsonl", "\n".join(lines).encode()))
    assert bad["status"] == 400 and bad["error"]["param"] == "file"
    assert bad["error"]["message"].startswith("mine.jsonl:2: field 'output' is missing")  # the CLI's sentence, with the user's file name
    assert _json(studio.post("/studio/api/data?filename=mine.exe", b"MZ"))["status"] == 400
    for chunked in (False, True):  # a declared length over the limit is refused at once; an undeclared one once it passes it
        status, body = _oversized_upload(studio, chunked)
        assert status == 413 and json.loads(body)["error"]["code"] == "file_too_large"
    assert sorted(p.name for p in (root / "data").iterdir()) == before


def test_an_upload_is_listed_previewed_in_pages_and_counted(studio, upload, small_data):
    sets = {s["name"]: s for s in _json(studio.get("/studio/api/data"))["sets"]}
    assert sets[upload]["kind"] == "upload" and sets[upload]["description"] == small_data.name and sets[upload]["examples"] == 8
    page = _json(studio.get(f"/studio/api/data/{upload}?offset=6&limit=5"))
    assert page["total"] == 8 and [e["instruction"] for e in page["examples"]] == ["验证问题0", "验证问题1"]
    assert page["examples"][0]["source"] == f"{small_data.name}:7"
    stats = _json(studio.get(f"/studio/api/data/{upload}/stats"))
    assert stats["splits"] == {"train": 6, "validation": 2} and stats["languages"] == {"zh": 8} and stats["personal_data"] == []
    assert 0 < stats["tokens"]["p50"] <= stats["tokens"]["max"]
    builtin = _json(studio.get("/studio/api/data/banking/stats"))
    assert builtin["total"] == 360 and len(builtin["categories"]) == 12


# ------------------------------------------------------------------ settings and runs
def test_the_form_is_the_settings_and_a_bad_value_names_its_field(studio, upload):
    fields = {f["key"]: f for f in _json(studio.get("/studio/api/settings"))["fields"]}
    from banklora.config import flags

    assert set(fields) == {f.key for f in flags()} - {"output_dir", "checkpoint_dir", "base_model"}  # the studio names runs, serves one base
    assert fields["lora.r"]["default"] == 8 and fields["lora.r"]["type"] == "int" and "rank" in fields["lora.r"]["help"]
    for settings, param, words in (({"lora.r": 0}, "lora.r", "--lora-r must be at least 1"), ({"epochs": "abc"}, "epochs", "must be a number"),
                                   ({"dtype": "fp16"}, "dtype", "fp16 is refused"), ({"no_such": 1}, "no_such", "not a training setting"),
                                   ({"data": ["upload-000000000000.jsonl"]}, "data", "upload it first")):
        out = _json(studio.post("/studio/api/jobs", {"kind": "train", "name": "bad", "settings": {**FAST, **settings}}))
        assert out["status"] == 400 and out["error"]["param"] == param and words in out["error"]["message"], out


def test_a_second_run_waits_in_the_queue_then_is_served_without_a_restart(studio, upload):
    first, second = _train(studio, "first", upload, epochs=2), _train(studio, "second", upload, epochs=1)
    assert second["state"] == "queued" and second["position"] in (1, 2)  # 2 while the worker has not started the first yet
    listed = [j["id"] for j in _json(studio.get("/studio/api/jobs"))["jobs"]]
    assert listed.index(second["id"]) < listed.index(first["id"])  # newest first
    first, second = _ended(studio, first["id"]), _ended(studio, second["id"])
    assert first["state"] == second["state"] == "done" and first["result"] == {"adapter": "first"}
    assert second["started"] >= first["ended"]  # one run at a time
    deadline = time.time() + 120  # the engine loads the adapter in the background
    while "second" not in {m.id for m in studio.client().models.list().data} and time.time() < deadline:
        time.sleep(0.5)
    client = studio.client()
    assert {"first", "second"} <= {m.id for m in client.models.list().data}
    answer = client.chat.completions.create(model="second", messages=[{"role": "user", "content": "问题1：如何办理业务1？"}], max_tokens=4)
    assert answer.model == "second" and answer.usage.completion_tokens >= 1
    adapters = {a["name"]: a for a in _json(studio.get("/studio/api/adapters"))["adapters"]}
    assert adapters["first"]["served"] and adapters["second"]["served"]
    taken = _json(studio.post("/studio/api/jobs", {"kind": "train", "name": "first", "settings": FAST}))
    assert taken["status"] == 409 and taken["error"]["param"] == "name"


def test_the_events_replay_a_finished_runs_whole_curve_and_log(studio, upload):
    job = _ended(studio, _train(studio, "curve", upload, epochs=2)["id"])
    events = _events(studio, job["id"])
    steps = [e["record"] for e in events if e["type"] == "metric" and "loss" in e["record"]]
    assert [r["step"] for r in steps] == list(range(1, 7)) and {r["total_steps"] for r in steps} == {6}
    assert [e["record"]["step"] for e in events if e["type"] == "metric" and "validation_loss" in e["record"]] == [3, 6]
    assert [e for e in events if e["type"] == "job"][-1]["job"]["state"] == "done"
    assert any("adapter saved to" in e["line"] for e in events if e["type"] == "log")


def test_stop_then_resume_gives_the_weights_of_an_uninterrupted_run(studio, upload):
    root = Path(_json(studio.get("/studio/api/info"))["workspace"])
    straight = _ended(studio, _train(studio, "straight", upload, epochs=4)["id"])
    assert straight["state"] == "done"
    job = _train(studio, "stopped", upload, epochs=4)
    _stepped(studio, job["id"], 2)
    assert _json(studio.post(f"/studio/api/jobs/{job['id']}/stop", {}))["status"] == 200
    again = _json(studio.post(f"/studio/api/jobs/{job['id']}/stop", {}))  # a second Ctrl-C would skip the checkpoint
    assert again["status"] in (409, 200) and (again["status"] == 409 or again["state"] != "running"), again
    job = _ended(studio, job["id"])
    assert job["state"] == "stopped" and job["resumable"] and job["returncode"] == 130, job
    assert job["progress"]["step"] < 12  # it stopped before the end
    resumed = _json(studio.post(f"/studio/api/jobs/{job['id']}/resume", {}))
    assert resumed["status"] == 201 and resumed["name"] == "stopped" and "--resume" in resumed["args"]
    assert _json(studio.post(f"/studio/api/jobs/{job['id']}/resume", {}))["status"] == 409  # once
    assert _ended(studio, resumed["id"])["state"] == "done"
    a, b = (load_file(root / "runs" / n / "adapter_model.safetensors") for n in ("straight", "stopped"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_server_restart_during_a_run_leaves_it_resumable(tmp_path, tiny_base, small_data):
    first = _studio(tmp_path / "ws", tiny_base)
    try:
        name = json.loads(first.post(f"/studio/api/data?filename={small_data.name}", small_data.read_bytes())[1])["name"]
        job = _train(first, "long", name, epochs=5)
        _stepped(first, job["id"], 2)
    finally:
        first.stop()  # SIGTERM: the server stops the run as Ctrl-C would, with a checkpoint
    second = _studio(tmp_path / "ws", tiny_base)
    try:
        found = _json(second.get(f"/studio/api/jobs/{job['id']}"))
        assert found["state"] == "interrupted" and found["resumable"], found
        resumed = _json(second.post(f"/studio/api/jobs/{job['id']}/resume", {}))
        done = _ended(second, resumed["id"])
        assert done["state"] == "done" and done["progress"]["step"] == done["progress"]["total_steps"] == 15
    finally:
        second.stop()


def test_compare_and_export_jobs_end_in_a_report_and_a_download(studio, upload):
    _ended(studio, _train(studio, "plain", upload, epochs=1, **{"lora.train_tokens": "none"})["id"])
    compare = _ended(studio, _submit(studio, {"kind": "compare", "adapters": ["plain"], "questions": "banking-eval", "limit": 1,
                                              "knowledge": False})["id"])
    assert compare["state"] == "done", compare
    status, html, _ = studio.get(compare["result"]["report"])
    assert status == 200 and "<html" in html and "plain" in html
    export = _ended(studio, _submit(studio, {"kind": "export", "adapter": "plain", "format": "gguf-lora"})["id"])
    assert export["state"] == "done" and export["result"]["download"].endswith(".gguf"), export
    request = urllib.request.Request(studio.url + export["result"]["download"], headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.read(4) == b"GGUF" and "attachment" in r.headers["content-disposition"]
    _ended(studio, _train(studio, "rows", upload, epochs=1)["id"])  # Gemma's turn-token rows trained, as by default
    refused = _ended(studio, _submit(studio, {"kind": "export", "adapter": "rows", "format": "gguf-lora"})["id"])
    assert refused["state"] == "failed" and "--format gguf" in refused["error"]  # turn-token rows: the merged export is the way
    bad = _json(studio.post("/studio/api/jobs", {"kind": "export", "adapter": "nope", "format": "gguf-lora"}))
    assert bad["status"] == 400 and bad["error"]["param"] == "adapter"
    merged = _ended(studio, _submit(studio, {"kind": "export", "adapter": "plain", "format": "hf"})["id"])
    assert merged["state"] == "done" and merged["result"]["download"].endswith("plain-hf.zip"), merged
    request = urllib.request.Request(studio.url + merged["result"]["download"], headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=120) as r, zipfile.ZipFile(io.BytesIO(r.read())) as archive:
        assert {"plain-hf/config.json", "plain-hf/model.safetensors"} <= set(archive.namelist())


# ------------------------------------------------------------------ the page in a browser
def test_the_whole_job_in_chromium_upload_train_reopen_chat_export(studio, tmp_path):
    import shutil

    from test_serve import CHROMIUM_FLAGS

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("BANKLORA_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    records = [{"instruction": f"网点{i}几点开门？", "output": f"网点{i}工作日9点开门，以网点公告为准。", "split": "train"} for i in range(6)]
    records += [{"instruction": "周末营业吗？", "output": "部分网点周末营业，请先查询。", "split": "validation"}] * 2
    good, bad = tmp_path / "faq.jsonl", tmp_path / "faq-draft.jsonl"
    good.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    bad.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:2]) + '{"instruction": "没有答案"}\n', encoding="utf-8")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.goto(studio.url + "/studio#data")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        # 1) a file with a bad line: the CLI's sentence, with its line and field
        page.set_input_files("#upload-file", str(bad))
        page.click("#upload")
        page.wait_for_function("document.getElementById('upload-error').textContent.includes('faq-draft.jsonl:3')")
        assert "field 'output' is missing" in page.inner_text("#upload-error")
        page.set_input_files("#upload-file", str(good))
        page.click("#upload")
        page.wait_for_function("document.getElementById('upload-ok').textContent.length > 0")
        name = next(s["name"] for s in _json(studio.get("/studio/api/data"))["sets"] if s["description"] == "faq.jsonl")
        page.wait_for_function("document.getElementById('stats-pii').textContent.length > 0")
        page.screenshot(path=str(artifacts / "studio-data.png"), full_page=True)
        # 2) a 3-step run from the form; the chart gains points while it runs
        page.click("#tab-train")
        page.fill("#run-name", "browser-run")
        page.fill("#f-lora-r", "0")  # refused by the CLI's own check, shown next to its field
        page.click("#start-train")
        page.wait_for_function("document.getElementById('err-lora-r').textContent.includes('--lora-r must be at least 1')")
        page.fill("#f-lora-r", "8")
        for field, value in (("data", name), ("epochs", "1"), ("batch_size", "2"), ("lora-train_tokens", "none"), ("report_to", "none"),
                             ("turn_end_budget", "0"), ("augment", "0")):
            page.fill(f"#f-{field}", value)
        page.click("#start-train")
        page.wait_for_function("document.getElementById('chart-job').textContent.includes('browser-run')"  # its chart, not an earlier run's
                               " && +document.getElementById('loss-chart').dataset.points >= 1", timeout=180_000)
        job = next(j for j in _json(studio.get("/studio/api/jobs"))["jobs"] if j["name"] == "browser-run")
        # 3) the page closes; the run goes on, and a page opened later shows its whole curve
        page.close()
        assert _ended(studio, job["id"])["state"] == "done"
        page = context.new_page()
        page.goto(studio.url + "/studio#train")
        page.wait_for_function("document.getElementById('loss-chart').dataset.points === '3'", timeout=60_000)
        assert "browser-run" in page.inner_text("#chart-job") and "3 / 3" in page.inner_text("#train-status").replace("步数 (step) ", "")
        page.screenshot(path=str(artifacts / "studio-train.png"), full_page=True)
        # 4) the new adapter in the chat, without a restart
        deadline = time.time() + 120
        while "browser-run" not in {m.id for m in studio.client().models.list().data} and time.time() < deadline:
            time.sleep(0.5)
        assert "browser-run" in {m.id for m in studio.client().models.list().data}
        page.click("#tab-chat")
        page.click("#reload-chat")
        chat = page.frame_locator("#chat-frame")
        chat.locator("#model option[value='browser-run']").wait_for(state="attached", timeout=60_000)
        chat.locator("#model").select_option("browser-run")
        chat.locator("#max_tokens").fill("8")
        chat.locator("#question").fill("网点1几点开门？")
        chat.locator("#question").press("Enter")
        chat.locator("#pane1 .meta").wait_for(timeout=60_000)
        assert chat.locator("#pane1 .msg.assistant").last.inner_text().strip()
        page.screenshot(path=str(artifacts / "studio-chat.png"), full_page=True)
        # 5) a LoRA GGUF export, downloaded from the page
        page.click("#tab-export")
        page.select_option("#export-adapter", "browser-run")
        page.select_option("#export-format", "gguf-lora")
        page.click("#start-export")
        page.wait_for_selector("#export-download:not(.hidden)", timeout=180_000)
        with page.expect_download() as download:
            page.click("#export-download")
        assert download.value.suggested_filename.endswith(".gguf")
        assert Path(download.value.path()).read_bytes()[:4] == b"GGUF"
        page.screenshot(path=str(artifacts / "studio-export.png"), full_page=True)
        browser.close()
