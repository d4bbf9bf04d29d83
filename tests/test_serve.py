"""`banklora serve` as users meet it: a real uvicorn process on 127.0.0.1, a tiny Gemma3 with two
tiny adapters of different weights, the real `openai` client, and raw HTTP for the error shapes;
and the engine's repetition penalties, checked against a hand-computed example and a reference."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

KEY = "test-key-0123"
QUESTIONS = ["如何办理业务1？", "信用卡逾期会怎样？", "你好", "请介绍一下定期存款提前支取的规则。"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], api_key: str | None = KEY, command: str = "serve") -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, BANKLORA_LOG_LEVEL="WARNING", COLUMNS="200")
        env.pop("BANKLORA_API_KEY", None)
        if api_key:
            env["BANKLORA_API_KEY"] = api_key
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"banklora-serve-{self.port}.log", "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "banklora", command, "--port", str(self.port), *args],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"banklora {command} exited with {self.process.returncode}:\n{self.log.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"banklora {command} did not answer /health in 180 s")

    def request(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY, timeout: float = 120):
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    def get(self, path: str, key: str | None = KEY):
        return self.request("GET", path, key=key)

    def post(self, path: str, payload, key: str | None = KEY, timeout: float = 120):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", path, body, key=key, timeout=timeout)

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kwargs)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base, small_data) -> dict[str, Path]:
    """Two adapters of clearly different weights on tiny_base (trained at different lr)."""
    from banklora.config import TrainSettings
    from banklora.train import train

    out = {}
    for name, lr in (("alpha", 1e-2), ("beta", 3e-2)):
        path = tmp_path_factory.mktemp("served") / name
        train(TrainSettings(base_model=str(tiny_base), data=str(small_data), output_dir=str(path), max_steps=3, batch_size=2, lr=lr),
              show_progress=False)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def server(adapters, tiny_base):
    s = Server(["--base-model", str(tiny_base), "--model-path", str(adapters["alpha"]), "--model-path", f"b={adapters['beta']}",
                "--max-batch-size", "8"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alone(server, tiny_base):
    """Each model's greedy answer to each question, asked one at a time."""
    client = server.client()
    names = [str(tiny_base), "alpha", "b"]
    return {(m, q): client.chat.completions.create(model=m, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12)
            .choices[0].message.content for m in names for q in QUESTIONS}


def test_models_lists_the_base_and_adapters_with_parent(server, tiny_base):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {str(tiny_base), "alpha", "b"}
    assert models["alpha"].parent == models["b"].parent == str(tiny_base)
    assert getattr(models[str(tiny_base)], "parent", None) is None


def test_answers_equal_chat_prompt_and_adapters_differ_from_base(server, alone, adapters, tiny_base, tokenizer):
    from banklora.data.format import encode_conversation

    from conftest import cli

    q = QUESTIONS[1]
    client = server.client()
    for model, path in ((str(tiny_base), tiny_base), ("alpha", adapters["alpha"]), ("b", adapters["beta"])):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12)
        prompt = encode_conversation(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True).input_ids
        assert r.usage.prompt_tokens == len(prompt)
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"  # a random tiny model never ends its turn
        assert r.usage.total_tokens == len(prompt) + 12
        args = ["chat", "--model-path", str(path), "--prompt", q, "--temperature", "0", "--max-new-tokens", "12", "--no-stream"]
        args += ["--base-model", str(tiny_base)] if model != str(tiny_base) else []
        result = cli(*args)
        assert result.returncode == 0, result.stderr
        # chat merges the adapter into the weights; the server keeps it beside the base: same greedy tokens here
        assert r.choices[0].message.content.strip() == result.stdout.strip()
    base = [alone[(str(tiny_base), q)] for q in QUESTIONS]
    assert base != [alone[("alpha", q)] for q in QUESTIONS] and base != [alone[("b", q)] for q in QUESTIONS]
    assert [alone[("alpha", q)] for q in QUESTIONS] != [alone[("b", q)] for q in QUESTIONS]


def test_streaming_gives_the_same_answer_then_usage_then_done(server, alone):
    client = server.client()
    chunks = list(client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0,
                                                 max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone[("alpha", QUESTIONS[0])]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    status, body, headers = server.post("/v1/chat/completions", {"model": "b", "messages": [{"role": "user", "content": "你好"}],
                                                                 "max_tokens": 3, "temperature": 0, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completions_endpoint_and_stop_strings(server, tiny_base):
    client = server.client()
    full = client.completions.create(model="alpha", prompt="银行", temperature=0, max_tokens=8)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 8 and full.choices[0].finish_reason == "length" and text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="alpha", prompt="银行", temperature=0, max_tokens=8,
                                                                               stream=True))
    assert streamed == text
    stop = text[len(text) // 2:][:2] or text[-1]
    cut = client.completions.create(model="alpha", prompt="银行", temperature=0, max_tokens=8, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.find(stop)]
    cut_stream = "".join(c.choices[0].text for c in client.completions.create(model="alpha", prompt="银行", temperature=0,
                                                                                 max_tokens=8, stop=[stop], stream=True))
    assert cut_stream == text[: text.find(stop)]


def test_sampling_with_a_seed_repeats_and_temperature_varies(server):
    client = server.client()

    def ask(seed):
        return client.chat.completions.create(model="b", messages=[{"role": "user", "content": "你好"}], temperature=1.5, top_p=0.95,
                                              max_tokens=10, seed=seed).choices[0].message.content

    assert ask(7) == ask(7)
    assert len({ask(s) for s in range(4)}) > 1


CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}


@pytest.mark.parametrize("change, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -2.1}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.2}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", ""]}, "stop"),
    ({"n": 2}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "b"}]}, "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": None}, "model"),
    ({"seed": 99999999999999999999999}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "balance"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi\ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "\udfff"}]}]}, "messages[0].content[1].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "messages[0].content[0].type"),
    ({"stop": "a\udfff"}, "stop"),
])
def test_bad_requests_get_openai_errors_with_param(server, change, param):
    status, body, _ = server.post("/v1/chat/completions", {**CHAT, **change})
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_unknown_model_context_overflow_bad_json_and_unknown_route(server):
    status, body, _ = server.post("/v1/chat/completions", {**CHAT, "model": "nope"})
    error = json.loads(body)["error"]
    assert status == 404 and error["param"] == "model" and error["code"] == "model_not_found" and "alpha" in error["message"]
    status, body, _ = server.post("/v1/chat/completions", {**CHAT, "max_tokens": 1020})  # the tiny model's context: 1024
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "context_length_exceeded" and "1024" in error["message"] and "1020" in error["message"]
    status, body, headers = server.post("/v1/chat/completions", {**CHAT, "max_tokens": 1020, "stream": True})
    assert status == 400 and headers["content-type"].startswith("application/json")  # refused before any stream bytes
    status, body, _ = server.post("/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    status, body, _ = server.get("/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)
    status, body, _ = server.post("/v1/completions", {"model": "alpha", "prompt": ["a", "b"]})
    assert status == 400 and json.loads(body)["error"]["param"] == "prompt"


def test_a_lone_surrogate_prompt_is_a_400_and_what_changes_nothing_is_accepted(server):
    status, body, _ = server.post("/v1/completions", {"model": "alpha", "prompt": "hi\udfff", "max_tokens": 2})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "prompt" and "surrogate" in error["message"]
    quiet = {"logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "seed": 2**63 - 1}
    status, body, _ = server.post("/v1/chat/completions", {**CHAT, **quiet})
    assert status == 200, body
    status, body, _ = server.post("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "caf\u00e9 \ud83d\ude00"}]})
    assert status == 200, body  # a real surrogate pair is a character (an emoji), not an error


def test_the_openai_client_sees_these_errors(server):
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        server.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_repetition_penalties_reach_the_engine_through_the_openai_client(server, tiny_base):
    """frequency_penalty / presence_penalty as OpenAI parameters, repetition_penalty as vLLM's extra
    (extra_body): neutral values change nothing, others change a looping answer exactly as
    `banklora chat` with the same flags answers, and out-of-range values are 400 naming the param."""
    import openai

    from conftest import cli

    client, base, q = server.client(), str(tiny_base), "你好"

    def ask(**kw):
        return client.chat.completions.create(model=base, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12,
                                              **kw).choices[0].message.content

    def chat(*flags):
        result = cli("chat", "--model-path", base, "--prompt", q, "--temperature", "0", "--max-new-tokens", "12", "--no-stream", *flags)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    plain = ask()
    assert ask(frequency_penalty=0, presence_penalty=0, extra_body={"repetition_penalty": 1.0}) == plain
    for kw, flags in (({"extra_body": {"repetition_penalty": 1.5}}, ("--repetition-penalty", "1.5")),
                      ({"frequency_penalty": 1.0, "presence_penalty": 0.5}, ("--frequency-penalty", "1.0", "--presence-penalty", "0.5"))):
        answer = ask(**kw)
        assert answer != plain and answer.strip() == chat(*flags)
    completion = client.completions.create(model=base, prompt="银行", temperature=0, max_tokens=8)
    penalized = client.completions.create(model=base, prompt="银行", temperature=0, max_tokens=8, frequency_penalty=2,
                                          extra_body={"repetition_penalty": 2})
    assert penalized.choices[0].text != completion.choices[0].text
    for kw, param in (({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty"),
                      ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty")):
        with pytest.raises(openai.BadRequestError) as bad:
            ask(**kw)
        assert bad.value.status_code == 400 and bad.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=base, prompt="银行", max_tokens=2, extra_body={"repetition_penalty": 0})
    assert bad.value.body["param"] == "repetition_penalty"


def test_api_key_is_required_except_for_health_and_the_page(server):
    for key in (None, "wrong-key", KEY + "x"):
        status, body, _ = server.get("/v1/models", key=key)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert server.post("/v1/chat/completions", CHAT, key=key)[0] == 401
        assert server.get("/metrics", key=key)[0] == 401
    assert server.get("/health", key=None)[0] == 200
    status, page, headers = server.get("/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html") and "对比模式" in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


def test_eight_concurrent_requests_over_three_models_equal_their_answers_alone(server, alone, tiny_base):
    jobs = [(m, q) for m in (str(tiny_base), "alpha", "b") for q in QUESTIONS][:8]
    results: dict = {}

    def ask(job):
        model, q = job
        results[job] = server.client().chat.completions.create(model=model, messages=[{"role": "user", "content": q}], temperature=0,
                                                              max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {job: results.get(job) for job in jobs} == {job: alone[job] for job in jobs}


def test_cancelled_requests_free_their_slots(server):
    import openai

    def impatient():
        try:
            server.client(timeout=0.5).chat.completions.create(model="b", messages=[{"role": "user", "content": "你好"}],
                                                               temperature=0, max_tokens=1000)
        except openai.APITimeoutError:
            pass

    def impatient_stream():
        stream = server.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": "你好"}],
                                                         temperature=0, max_tokens=1000, stream=True)
        next(iter(stream))
        stream.close()  # the client hangs up after the first chunk

    threads = [threading.Thread(target=f) for f in [impatient] * 10 + [impatient_stream] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    deadline = time.time() + 20
    while time.time() < deadline:
        health = json.loads(server.get("/health", key=None)[1])
        if health["running"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.2)
    assert health["running"] == 0 and health["waiting"] == 0, health  # 1000-token answers would still be decoding
    r = server.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": "你好"}], temperature=0, max_tokens=4)
    assert r.usage.completion_tokens == 4


def test_metrics_count_requests_tokens_and_first_token_times(server):
    server.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": "你好"}], temperature=0, max_tokens=3)
    status, text, headers = server.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['banklora_requests_total{endpoint="chat",model="alpha",status="200"}']) >= 1
    assert float(lines['banklora_completion_tokens_total{model="alpha"}']) >= 3
    assert float(lines['banklora_time_to_first_token_seconds_count{endpoint="chat"}']) >= 1
    assert "banklora_queue_waiting" in lines and "banklora_batch_running" in lines
    # the worker's steps: a prefill and at least 2 decode steps (3 tokens), each with at least one row
    assert float(lines['banklora_step_rows_count{kind="prefill"}']) >= 1
    decode_steps = float(lines['banklora_step_rows_count{kind="decode"}'])
    assert decode_steps >= 2 and float(lines['banklora_step_rows_sum{kind="decode"}']) >= decode_steps
    assert float(lines['banklora_step_seconds_sum{kind="decode"}']) > 0


def _metric(server, name: str) -> float:
    text = server.get("/metrics")[1]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_count_refused_requests_by_status(server):
    before = {code: _metric(server, f'banklora_requests_total{{endpoint="chat",model="{m}",status="{code}"}}')
              for code, m in (("400", "alpha"), ("401", "-"), ("404", "-"))}
    server.post("/v1/chat/completions", {**CHAT, "temperature": 9})
    server.post("/v1/chat/completions", {**CHAT, "n": 3})
    server.post("/v1/chat/completions", CHAT, key="wrong")
    server.post("/v1/chat/completions", {**CHAT, "model": "nope"})
    after = {code: _metric(server, f'banklora_requests_total{{endpoint="chat",model="{m}",status="{code}"}}')
             for code, m in (("400", "alpha"), ("401", "-"), ("404", "-"))}
    # temperature 9 fails pydantic before the model is known ("-"); n=3 is refused by the route, for "alpha"
    assert after["400"] - before["400"] == 1 and after["401"] - before["401"] == 1 and after["404"] - before["404"] == 1
    assert _metric(server, 'banklora_requests_total{endpoint="chat",model="-",status="400"}') >= 1
    assert 'model="nope"' not in server.get("/metrics")[1]  # no series per unknown name a client sends


def test_docs_pages_that_need_a_cdn_are_off_and_the_schema_is_served(server):
    assert server.get("/docs", key=None)[0] == 404 and server.get("/redoc", key=None)[0] == 404
    status, body, _ = server.get("/openapi.json", key=None)
    assert status == 200 and "/v1/chat/completions" in json.loads(body)["paths"]


def test_a_non_ascii_api_key_matches_its_utf8_bytes(adapters, tiny_base):
    s = Server(["--base-model", str(tiny_base)], api_key="clé-銀行")
    try:
        def status(header: bytes) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
            conn.putrequest("GET", "/v1/models")
            conn.putheader("Authorization", header)
            conn.endheaders()
            code = conn.getresponse().status
            conn.close()
            return code

        assert status(b"Bearer " + "clé-銀行".encode("utf-8")) == 200
        assert status(b"Bearer " + "clé".encode("latin-1")) == 401
        assert status(b"Bearer cl") == 401
    finally:
        s.stop()


def test_serve_checks_the_port_and_dora_before_loading_and_names_the_real_port(adapters, tiny_base, tmp_path):
    from conftest import cli

    for port in ("70000", "-1"):
        result = cli("serve", "--base-model", str(tiny_base), "--port", port)
        assert result.returncode == 2 and "--port must be in 0-65535" in result.stderr, result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("serve", "--base-model", str(tiny_base), "--port", str(taken.getsockname()[1]))
        assert result.returncode == 2 and "cannot listen" in result.stderr and "--port 0" in result.stderr, result.stderr
    dora = tmp_path / "dora"
    shutil.copytree(adapters["alpha"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    result = cli("serve", "--base-model", str(tiny_base), "--model-path", str(dora), "--port", "0")
    assert result.returncode == 2 and "a DoRA adapter cannot be served" in " ".join(result.stderr.split()), result.stderr
    # --port 0: the log names the port the system chose, and the server answers there
    env = dict(os.environ, BANKLORA_LOG_LEVEL="INFO", COLUMNS="300")
    env.pop("BANKLORA_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "banklora", "serve", "--base-model", str(tiny_base), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        port = None
        for line in process.stdout:
            found = re.search(r"OpenAI API at http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                port = int(found.group(1))
                break
        assert port and port != 0
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_full_queue_answers_429_with_retry_after(adapters, tiny_base):
    s = Server(["--base-model", str(tiny_base), "--model-path", str(adapters["alpha"]), "--max-batch-size", "1", "--max-queue", "1"])
    try:
        long = {**CHAT, "max_tokens": 1000, "stream": True}

        def post_long():
            try:
                s.post("/v1/chat/completions", long)
            except (OSError, http.client.HTTPException):  # the server is killed at the end
                pass

        # one decoding, one waiting: the next is refused at once
        first = threading.Thread(target=post_long, daemon=True)
        first.start()
        deadline = time.time() + 20
        while json.loads(s.get("/health", key=None)[1])["running"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        second = threading.Thread(target=post_long, daemon=True)
        second.start()
        while json.loads(s.get("/health", key=None)[1])["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        status, body, headers = s.post("/v1/chat/completions", CHAT)
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
        assert _metric(s, 'banklora_requests_total{endpoint="chat",model="alpha",status="429"}') == 1  # the operator sees it
    finally:
        s.stop(kill=True)  # the two long answers are not waited for


def test_serve_refuses_bad_flags_with_a_sentence(tmp_path, adapters):
    from conftest import cli

    result = cli("serve", "--model-path", str(tmp_path))
    assert result.returncode == 2 and "not a LoRA adapter directory" in result.stderr
    result = cli("serve", "--model-path", f"bad.name={adapters['alpha']}")
    assert result.returncode == 2 and "bad.name" in result.stderr
    result = cli("serve", "--model-path", f"x={adapters['alpha']}", "--model-path", f"x={adapters['beta']}")
    assert result.returncode == 2 and "two adapters are named 'x'" in result.stderr
    result = cli("serve", "--model-path", str(adapters["alpha"]), "--fp16")
    assert result.returncode == 2 and "--fp16" in result.stderr


@pytest.fixture
def in_process(adapters, tiny_base):
    """The same app under uvicorn in this process, so a test can reach into its engine."""
    import uvicorn

    from banklora.serve.launch import build

    app, _, _ = build([str(adapters["alpha"])], base_model=str(tiny_base))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.engine
    server.should_exit = True
    thread.join(timeout=30)


def test_a_failure_mid_stream_sends_an_error_chunk_then_done(in_process):
    url, engine = in_process
    real, calls = engine._forward, []

    def failing_on_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    engine._forward = failing_on_the_third_step
    body = json.dumps({**CHAT, "max_tokens": 10, "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    assert len(calls) == 3 and events[0].startswith("data: ") and '"role": "assistant"' in events[0]
    engine._forward = real  # the worker survives: the next request is answered
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**CHAT, "temperature": 0}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] == 2


def test_schemathesis_finds_no_server_error_or_schema_violation(server):
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    result = subprocess.run([str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
                             "-H", f"Authorization: Bearer {KEY}", "--checks", checks, "--max-examples", "25", "--seed", "1",
                             "--request-timeout", "60", "--no-color"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def test_web_chat_streams_switches_model_and_compares_side_by_side_in_chromium(server, alone, tiny_base):
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    base, q = str(tiny_base), QUESTIONS[1]
    artifacts = Path(os.environ.get("BANKLORA_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)

    def ask(page, panes):
        page.fill("#question", q)
        page.press("#question", "Enter")
        for pane in panes:
            page.wait_for_selector(f"#{pane} .meta", timeout=60_000)
        return [page.locator(f"#{pane} .msg.assistant").last.inner_text().strip() for pane in panes]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(server.url + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        page.fill("#max_tokens", "12")
        # count how often the answer's text changes while it streams in
        page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
            .observe(document.getElementById('pane1'), {subtree: true, characterData: true, childList: true}); }""")
        assert ask(page, ["pane1"]) == [alone[(base, q)].strip()]
        assert page.evaluate("window.updates") > 3  # question, streamed pieces, meta line: not one final paint
        page.select_option("#model", "alpha")
        assert ask(page, ["pane1"]) == [alone[("alpha", q)].strip()]
        page.check("#side")  # the left pane goes back to the base and starts afresh
        assert page.input_value("#model") == base and page.input_value("#model2") == "alpha"
        assert page.locator("#pane1 .msg").count() == 0
        page.select_option("#model2", "b")
        assert ask(page, ["pane1", "pane2"]) == [alone[(base, q)].strip(), alone[("b", q)].strip()]
        page.screenshot(path=str(artifacts / "web-chat-side-by-side.png"), full_page=True)
        browser.close()


# ------------------------------------------------------------------ the engine's repetition penalties
def test_penalties_follow_vllm_on_a_hand_computed_example():
    """vLLM's apply_penalties: repetition scales the prompt's and the answer's tokens (divides a
    positive logit, multiplies the others); frequency and presence count the answer's tokens only."""
    import torch

    from banklora.inference.engine import apply_penalties

    logits = torch.tensor([2.0, -1.0, 0.5, -0.5, 3.0, 0.0])
    tokens = torch.tensor([0, 1, 5, 2, 3])  # the prompt holds 0, 1 and 5; the answer so far 2, 2, 3
    counts = torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0])  # times in the answer

    def penalized(frequency=0.0, presence=0.0, repetition=1.0):
        return apply_penalties(logits.clone(), tokens, counts, frequency, presence, repetition).tolist()

    assert penalized(repetition=2.0) == [1.0, -2.0, 0.25, -1.0, 3.0, 0.0]  # 4 is in neither; 0 stays 0
    assert penalized(repetition=0.5) == [4.0, -0.5, 1.0, -0.25, 3.0, 0.0]  # < 1 favours repeats
    assert penalized(frequency=0.5) == [2.0, -1.0, -0.5, -1.0, 3.0, 0.0]  # minus 0.5 x count; the prompt's tokens untouched
    assert penalized(presence=0.25) == [2.0, -1.0, 0.25, -0.75, 3.0, 0.0]  # minus 0.25 once, however often
    assert penalized(frequency=-0.5, presence=-1.0) == [2.0, -1.0, 2.5, 1.0, 3.0, 0.0]  # negative: encourages repeats
    assert penalized(2.0, 1.0, 2.0) == [1.0, -2.0, 0.25 - 4.0 - 1.0, -1.0 - 2.0 - 1.0, 3.0, 0.0]  # repetition first, then the rest
    for extreme in (1e-40, 1e40):  # beyond float32: the largest finite logits, never inf or NaN for the sampler
        assert torch.isfinite(apply_penalties(logits.clone(), tokens, counts, 0.0, 0.0, extreme)).all()
    noise = torch.randn(1000)
    seen = torch.arange(0, 1000, 3)
    assert torch.equal(apply_penalties(noise.clone(), seen, torch.ones(len(seen)), 0.0, 0.0, 1.0), noise)  # neutral: bit for bit


def _answer_tokens(loaded, prompts: list[list[int]], params: list) -> list[list[int]]:
    """Token ids the engine chooses for each prompt with its own SamplingParams, all in one batch."""
    from banklora.inference.engine import Engine, Request

    engine = Engine(loaded.model, loaded.tokenizer, peft=False, max_batch_size=len(prompts))
    requests = [Request(list(p), None, sp, sink=lambda event: None) for p, sp in zip(prompts, params)]
    tokens = {id(r): [] for r in requests}
    advance = engine._advance

    def recording(row, logits, greedy=None):
        advance(row, logits, greedy)
        tokens[id(row.request)] = list(row.generated)

    engine._advance = recording
    for r in requests:
        engine.submit(r)
    engine.run_until_done()
    return [tokens[id(r)] for r in requests]


def test_the_engine_penalizes_each_row_as_a_from_scratch_reference_does(tiny_base):
    """On the tiny model, whose greedy answer loops on one token: neutral penalties give the answer
    without penalties token for token; penalties break the loop, each row with its own, the same
    in a batch as alone, and equal to transformers' generate with the counts recomputed at every
    step (and, for repetition alone, to transformers' own repetition_penalty)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from banklora.data.format import encode_prompt, stop_token_ids
    from banklora.modeling import load
    from banklora.inference.engine import SamplingParams, apply_penalties

    loaded = load(str(tiny_base))
    prompts = [encode_prompt(loaded.tokenizer, q) for q in ("你好", "怎么开户？", "信用卡逾期会怎样？")]
    n = 16
    plain = _answer_tokens(loaded, prompts, [SamplingParams(max_tokens=n)] * 3)
    assert all(len(set(t)) < len(t) / 2 for t in plain)  # a random tiny model repeats itself
    neutral = SamplingParams(max_tokens=n, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0)
    assert not neutral.penalized and _answer_tokens(loaded, prompts, [neutral] * 3) == plain
    asks = [SamplingParams(max_tokens=n, repetition_penalty=1.5), SamplingParams(max_tokens=n, frequency_penalty=1.0),
            SamplingParams(max_tokens=n, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2)]
    batch = _answer_tokens(loaded, [prompts[0]] * 3 + [prompts[1]], [*asks, SamplingParams(max_tokens=n)])
    assert batch[3] == plain[1]  # a row without penalties beside penalized ones is untouched
    stops = stop_token_ids(loaded.tokenizer)

    class FromScratch(LogitsProcessor):
        def __init__(self, prompt_length: int, params) -> None:
            self.prompt_length, self.params = prompt_length, params

        def __call__(self, input_ids, scores):
            seen = input_ids[0].unique()  # prompt and answer so far
            counts = (input_ids[0, self.prompt_length:, None] == seen).sum(0).float()  # times in the answer
            p = self.params
            apply_penalties(scores[0], seen, counts, p.frequency_penalty, p.presence_penalty, p.repetition_penalty)
            return scores

    def generate(prompt, **kw):
        with torch.no_grad():
            out = loaded.model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                                        max_new_tokens=n, do_sample=False, eos_token_id=stops, pad_token_id=0, **kw)
        return out[0, len(prompt):].tolist()

    for params, got in zip(asks, batch):
        assert got != plain[0]
        assert got == _answer_tokens(loaded, [prompts[0]], [params])[0]  # the same alone as in the batch
        assert got == generate(prompts[0], logits_processor=LogitsProcessorList([FromScratch(len(prompts[0]), params)]))
    assert batch[0] == generate(prompts[0], repetition_penalty=1.5)
