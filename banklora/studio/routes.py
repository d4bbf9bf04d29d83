"""The studio's HTTP side: /studio (the page) and /studio/api/* (data, settings, jobs, adapters),
/studio/files/* (reports and exports). Every error is an OpenAI error object, as on /v1; with an
API key, every endpoint but the page needs it. docs/studio.md describes each endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import re
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request as HttpRequest
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse

from banklora import checkpoint
from banklora.config import QUICKSTART, TrainSettings, flags as setting_flags, load_train_settings
from banklora.errors import UsageError
from banklora.serve.schemas import ApiError
from banklora.studio.jobs import FINAL, Job, Jobs
from banklora.studio.workspace import UPLOAD_LIMIT, OutsideWorkspace, Workspace

EXPORT_FORMATS = ("hf", "gguf", "gguf-lora")
QUESTION_SETS = ("banking-eval", "banking")
EVENTS_POLL_S = 0.5
MAX_JOB_BODY = 64 * 1024  # bytes: a job request is a few settings


def add_studio(app: FastAPI, workspace: Workspace, jobs: Jobs, base_model: str, authorize, *, keyed: bool,
               hosts: frozenset[str] | None = None) -> None:
    """Mount the studio on the serve app (`authorize` is the app's key check; keyed: the server has
    a key; hosts: the Host names it answers to, None for any)."""

    def same_site(request: HttpRequest) -> None:
        """Requests from other web pages are refused: a page elsewhere could otherwise start or
        stop runs on this machine (a cross-site POST needs no preflight), or, through a DNS name
        that points here (rebinding), read the workspace."""
        host = request.headers.get("host", "")
        if hosts is not None and urlsplit(f"//{host}").hostname not in hosts:
            raise ApiError(403, f"the studio answers to {', '.join(sorted(hosts))} only (the request's Host is {host!r}); "
                                "open it at http://127.0.0.1:PORT/studio", type="permission_error", code="host_not_allowed")
        if request.method in ("GET", "HEAD"):
            return
        origin, site = request.headers.get("origin"), request.headers.get("sec-fetch-site")
        if (origin and urlsplit(origin).netloc != host) or site not in (None, "same-origin", "none"):
            raise ApiError(403, "a request from another web site was refused; use the studio's own page", type="permission_error",
                           code="cross_site_request")

    api = APIRouter(prefix="/studio", dependencies=[Depends(same_site), Depends(authorize)])

    @app.get("/studio", response_class=HTMLResponse, include_in_schema=False, dependencies=[Depends(same_site)])
    async def page():
        return resources.files("banklora.studio").joinpath("static/studio.html").read_text(encoding="utf-8")

    @api.get("/api/info")
    async def info() -> dict:
        return {"base": base_model, "workspace": str(workspace.root), "auth": keyed, "upload_limit_bytes": UPLOAD_LIMIT}

    # ---------------------------------------------------------------- data
    @api.get("/api/data")
    async def data_sets() -> dict:
        from banklora.data.dataset import BUILTIN

        sets = [{"name": n, "kind": "builtin", "examples": _builtin_count(n), "description": _BUILTIN_TEXT.get(n, "")} for n in BUILTIN]
        sets += [{"name": u["name"], "kind": "upload", "examples": u["examples"], "description": u["filename"]} for u in workspace.uploads()]
        return {"sets": sets}

    @api.post("/api/data", status_code=201)
    async def upload(request: HttpRequest, filename: str = "") -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > UPLOAD_LIMIT:
            raise ApiError(413, f"{filename}: {int(declared):,} bytes is over the upload limit of {UPLOAD_LIMIT:,}", param="file",
                           code="file_too_large")
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a body without Content-Length cannot exceed it either
            body += chunk
            if len(body) > UPLOAD_LIMIT:
                raise ApiError(413, f"{filename}: over the upload limit of {UPLOAD_LIMIT:,} bytes", param="file", code="file_too_large")
        try:
            name, _ = await asyncio.to_thread(workspace.store_upload, filename, bytes(body))
        except UsageError as exc:
            raise ApiError(400, str(exc), param="file") from exc
        meta = next(u for u in workspace.uploads() if u["name"] == name)
        return {"name": name, "filename": meta["filename"], "examples": meta["examples"]}

    @api.get("/api/data/{name}")
    async def preview(name: str, offset: int = 0, limit: int = 20) -> dict:
        examples = await asyncio.to_thread(_examples, workspace, name)
        offset, limit = max(0, offset), min(max(1, limit), 200)
        rows = [{"instruction": e.instruction, "input": e.input, "output": e.output, "category": e.category, "language": e.language,
                 "split": e.split, "source": e.source} for e in examples[offset:offset + limit]]
        return {"name": name, "total": len(examples), "offset": offset, "limit": limit, "examples": rows}

    @api.get("/api/data/{name}/stats")
    async def stats(name: str) -> dict:
        return await asyncio.to_thread(_stats, workspace, name, base_model)

    # ---------------------------------------------------------------- settings and adapters
    @api.get("/api/settings")
    async def settings() -> dict:
        fields = [{"key": f.key, "flag": f.flag, "type": f.type.__name__, "help": f.help,
                   "default": base_model if f.key == "base_model" else list(f.default) if isinstance(f.default, tuple) else f.default}
                  for f in setting_flags() if f.key not in _NOT_IN_FORM]
        return {"fields": fields, "quickstart": QUICKSTART}

    @api.get("/api/adapters")
    async def adapters(request: HttpRequest) -> dict:
        served = request.app.state.served.adapters
        return {"adapters": [{"name": name, "path": str(path), "served": name in served, "created": _iso(path.stat().st_mtime)}
                             for name, path in workspace.adapters()]}

    # ---------------------------------------------------------------- jobs
    @api.get("/api/jobs")
    async def job_list() -> dict:
        with jobs.lock:
            return {"jobs": [_job(jobs, j) for j in jobs.listing()]}

    @api.post("/api/jobs", status_code=201)
    async def submit(request: HttpRequest) -> dict:
        raw = await request.body()
        if len(raw) > MAX_JOB_BODY:
            raise ApiError(413, f"a job request is at most {MAX_JOB_BODY:,} bytes", code="request_too_large")
        try:
            body = json.loads(raw or b"null")
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {type(exc).__name__}") from exc
        if not isinstance(body, dict) or body.get("kind") not in ("train", "compare", "export"):
            raise ApiError(400, 'give {"kind": "train" | "compare" | "export", ...}', param="kind")
        make = {"train": _train_job, "compare": _compare_job, "export": _export_job}[body["kind"]]
        with jobs.lock:
            job = make(workspace, jobs, body, base_model)
            return _job(jobs, job)

    @api.get("/api/jobs/{job_id}")
    async def job_get(job_id: str) -> dict:
        with jobs.lock:
            return _job(jobs, _find(jobs, job_id))

    @api.post("/api/jobs/{job_id}/stop")
    async def job_stop(job_id: str) -> dict:
        with jobs.lock:
            job = _find(jobs, job_id)
            if job.state in FINAL:
                raise ApiError(409, f"job {job_id} has ended ({job.state}); nothing to stop", code="job_ended")
            if not jobs.stop(job):
                raise ApiError(409, f"job {job_id} is stopping already: it finishes its step and writes a checkpoint", code="stopping")
            return _job(jobs, job)

    @api.post("/api/jobs/{job_id}/resume", status_code=201)
    async def job_resume(job_id: str) -> dict:
        with jobs.lock:
            job = _find(jobs, job_id)
            if not jobs.resumable(job):
                raise ApiError(409, f"job {job_id} cannot be resumed: only a stopped or interrupted training run with a checkpoint "
                                    "can, once", code="not_resumable")
            return _job(jobs, jobs.resume(job))

    @api.get("/api/jobs/{job_id}/events")
    async def job_events(request: HttpRequest, job_id: str):
        job = _find(jobs, job_id)
        return StreamingResponse(_events(request, jobs, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/files/{path:path}")
    async def download(path: str):
        try:
            found = workspace.resolve(path)
            exists = found.is_file()
        except (OutsideWorkspace, OSError) as exc:
            raise ApiError(400, str(exc) if isinstance(exc, OutsideWorkspace) else f"{path!r}: not a file name here", param="path") from exc
        if not exists or not found.is_relative_to(workspace.reports) and not found.is_relative_to(workspace.exports):
            raise ApiError(404, f"{path}: no such report or export in the studio's workspace", param="path", code="not_found")
        return FileResponse(found, filename=found.name)

    app.include_router(api)


_BUILTIN_TEXT = {"banking": "内置银行问答 (360 条, 12 类, 中英文)", "banking-seed": "种子数据 (16 条)",
                 "banking-eval": "种子对比题 (8 题)", "banking-paraphrase": "训练题的换一种问法 (72 条)"}
_NOT_IN_FORM = ("output_dir", "checkpoint_dir", "base_model")  # the studio names runs (runs/<name>) and serves one base


@lru_cache(maxsize=None)
def _builtin_count(name: str) -> int:
    from banklora.data.dataset import load_examples

    return len(load_examples([name]))


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _find(jobs: Jobs, job_id: str) -> Job:
    job = jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}; GET /studio/api/jobs lists them", param="job_id", code="not_found")
    return job


def _job(jobs: Jobs, job: Job) -> dict:
    out = {k: v for k, v in dataclasses.asdict(job).items() if k not in ("pid", "created", "started", "ended")}
    out |= {"created": _iso(job.created), "started": _iso(job.started), "ended": _iso(job.ended), "position": jobs.position(job),
            "resumable": jobs.resumable(job), "progress": _progress(jobs, job), "result": _result(jobs, job)}
    return out


def _progress(jobs: Jobs, job: Job) -> dict | None:
    steps = [r for r in jobs.metrics(job) if "loss" in r and "total_steps" in r]
    if not steps:
        return None
    last = steps[-1]
    first = steps[0]
    done_now = last["step"] - first["step"] + 1
    rate = (last["elapsed_s"] - first["elapsed_s"]) / max(1, done_now - 1) if done_now > 1 else None  # s per step, this run's part
    eta = None if rate is None or job.state != "running" else round(rate * (last["total_steps"] - last["step"]), 1)
    return {"step": last["step"], "total_steps": last["total_steps"], "eta_s": eta, "tokens_per_second": last.get("tokens_per_second")}


def _result(jobs: Jobs, job: Job) -> dict | None:
    if job.state != "done":
        return None
    root = jobs.workspace.root
    if job.kind == "train":
        return {"adapter": job.name}
    if job.kind == "compare":
        html = (root / job.output).with_suffix(".html")
        return {"report": f"/studio/files/{html.relative_to(root)}", "json": f"/studio/files/{job.output}"}
    target = root / job.output  # gguf: the .gguf file in it; hf: the directory, zipped beside it when the export ended
    links = {p: f"/studio/files/{p.relative_to(root)}" for p in sorted(target.parent.rglob("*")) if p.is_file()}
    main = [link for p, link in links.items() if p.suffix in (".gguf", ".zip")]
    rest = [link for p, link in links.items() if p.parent == target and p.suffix not in (".gguf", ".safetensors")]  # Modelfile, model card
    return {"download": main[0], "files": rest} if main else None


async def _events(request: HttpRequest, jobs: Jobs, job: Job):
    """SSE: the job, then every metrics record and log line from the start, then what follows, until the job ends."""
    sent_metrics, sent_bytes, last_job = 0, 0, None
    log_path = jobs.log_path(job)
    while True:
        with jobs.lock:
            now = _job(jobs, job)
            final = job.state in FINAL
        if now != last_job:
            yield _sse({"type": "job", "job": now})
            last_job = now
        records = await asyncio.to_thread(jobs.metrics, job)
        for record in records[sent_metrics:]:
            yield _sse({"type": "metric", "record": record})
        sent_metrics = max(sent_metrics, len(records))
        if log_path.is_file():
            with log_path.open("rb") as f:
                f.seek(sent_bytes)
                chunk = f.read()
            whole = chunk[:chunk.rfind(b"\n") + 1] if not final else chunk  # whole lines while it runs
            sent_bytes += len(whole)
            for line in whole.decode("utf-8", "replace").splitlines():
                yield _sse({"type": "log", "line": line})
        if final or await request.is_disconnected():
            return
        await asyncio.sleep(EVENTS_POLL_S)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------- data
def _examples(workspace: Workspace, name: str):
    from banklora.data.dataset import BUILTIN, load_examples, load_file

    try:
        if name in BUILTIN:
            return load_examples([name])
        path = workspace.upload_path(name)
        shown = next((u["filename"] for u in workspace.uploads() if u["name"] == name), name)
        return load_file(path, shown=shown)
    except UsageError as exc:
        raise ApiError(404 if "not a data set" in str(exc) else 400, str(exc), param="name") from exc


def _stats(workspace: Workspace, name: str, base_model: str) -> dict:
    from banklora.data import privacy
    from banklora.data.stats import dataset_stats
    from banklora.modeling import load_tokenizer

    examples = _examples(workspace, name)
    found = dataset_stats(examples, load_tokenizer(base_model))
    return {"total": len(examples),
            "categories": [{"category": c.category, "count": c.count, "languages": c.languages} for c in found.categories],
            "languages": dict(found.languages), "splits": dict(found.splits),
            "tokens": {"p50": found.percentile(50), "p90": found.percentile(90), "p99": found.percentile(99), "max": max(found.lengths)},
            "personal_data": [str(f) for f in privacy.scan(examples)]}


def _data_spec(workspace: Workspace, name: str) -> str:
    from banklora.data.dataset import BUILTIN

    if name in BUILTIN:
        return name
    try:
        return str(workspace.upload_path(name))
    except UsageError as exc:
        raise ApiError(400, f"data: {exc}", param="data") from exc


# ---------------------------------------------------------------------------- jobs
_FLAG_IN_MESSAGE = re.compile(r"(--[a-z0-9-]+)")


def train_settings(form: dict, base_model: str, output_dir: Path) -> TrainSettings:
    """A form's settings ({key: value}, keys as the settings' flags name them: "epochs", "lora.r")
    through the CLI's own validation. A bad value is an ApiError whose param is its key."""
    by_key = {f.key: f for f in setting_flags()}
    overrides: dict = {"lora": {}, "base_model": base_model}
    for key, value in form.items():
        f = by_key.get(key)
        if f is None or key in _NOT_IN_FORM:
            raise ApiError(400, f"{key}: not a training setting; GET /studio/api/settings lists them", param=key)
        if value is None or value == "":
            continue
        value = _typed(f, value)
        if key.startswith("lora."):
            overrides["lora"][key[5:]] = value
        else:
            overrides[key] = value
    overrides["output_dir"] = str(output_dir)
    try:
        return load_train_settings(None, overrides)
    except (TypeError, ValueError) as exc:  # a value of the right type the settings still cannot take
        raise ApiError(400, f"settings: {exc}", param="settings") from exc
    except UsageError as exc:
        flag = next(iter(_FLAG_IN_MESSAGE.findall(str(exc))), None)
        param = next((f.key for f in setting_flags() if f.flag == flag), None)
        raise ApiError(400, str(exc), param=param) from exc


def _typed(f, value):
    """A form value as the setting's type (JSON numbers, booleans, strings; lists or comma strings)."""
    want = f.type
    try:
        if want is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if want is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if want is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(value, list):  # a list for a list setting, or for a comma-separated one
            if want not in (list, str) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value) if want is list else ",".join(value)
        if not isinstance(value, str):
            raise TypeError
        return tuple(s.strip() for s in value.split(",") if s.strip()) if want is list else value
    except (TypeError, ValueError, OverflowError):
        raise ApiError(400, f"{f.key} ({f.flag}) must be {_TYPE_WORDS[want]} (got {value!r})", param=f.key) from None


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", list: "a list of names", str: "text"}


def _train_job(workspace: Workspace, jobs: Jobs, body: dict, base_model: str) -> Job:
    name = body.get("name") or f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run = workspace.run_dir(name)  # a name of the allowed characters, or a UsageError
    except UsageError as exc:
        raise ApiError(400, str(exc), param="name") from exc
    output = str(run.relative_to(workspace.root))
    if name == base_model or name == Path(base_model).name:
        raise ApiError(400, f"run name {name!r} is the base model's name; the chat would not tell them apart", param="name")
    if run.exists() or jobs.busy_with(output) is not None or checkpoint.latest(workspace.root / f"{output}-checkpoints") is not None:
        raise ApiError(409, f"a run named {name!r} exists already; choose another name (or resume it from its job)", param="name",
                       code="run_exists")
    form = body.get("settings") or {}
    if not isinstance(form, dict):
        raise ApiError(400, 'settings: an object of training settings, e.g. {"epochs": 1, "lora.r": 16}', param="settings")
    form = dict(form)
    if "data" in form:
        data = form["data"] if isinstance(form["data"], list) else [form["data"]]
        if not data or not all(isinstance(d, str) for d in data):
            raise ApiError(400, "data: the names of one or more data sets (GET /studio/api/data lists them)", param="data")
        form["data"] = [_data_spec(workspace, d) for d in data]
    settings = train_settings(form, base_model, run)
    import yaml

    config = workspace.jobs / f"{name}.yaml"
    plain = json.loads(json.dumps(settings.to_dict()))  # tuples as lists
    config.write_text(f"# banklora train --config {config.name}  (written by the studio)\n" + yaml.safe_dump(plain, allow_unicode=True,
                                                                                                              sort_keys=False),
                      encoding="utf-8")
    return jobs.submit("train", name, ["train", "--config", str(config)], output)


def _compare_job(workspace: Workspace, jobs: Jobs, body: dict, base_model: str) -> Job:
    names = body.get("adapters") or []
    known = dict(workspace.adapters())
    if not isinstance(names, list) or not names or any(not isinstance(n, str) or n not in known for n in names):
        raise ApiError(400, f"adapters: name one or more trained adapters of this studio ({', '.join(known) or 'none yet'})", param="adapters")
    questions = body.get("questions") or "banking-eval"
    if not isinstance(questions, str) or questions not in QUESTION_SETS:
        raise ApiError(400, f"questions: one of {', '.join(QUESTION_SETS)} (got {questions!r})", param="questions")
    args = ["compare", "--peft-model-path", *[str(known[n]) for n in names], "--questions", questions, "--no-answers"]
    if body.get("knowledge") is False:  # the multiple-choice knowledge test: 120 more questions, on by default as in the CLI
        args += ["--knowledge", "none"]
    split = body.get("split")
    if split:
        if not isinstance(split, str) or split not in ("validation", "test"):
            raise ApiError(400, f"split: validation or test (got {split!r})", param="split")
        args += ["--split", split]
    limit = body.get("limit")
    if limit not in (None, ""):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ApiError(400, f"limit: a whole number of questions, at least 1 (got {limit!r})", param="limit")
        args += ["--limit", str(limit)]
    report = workspace.reports / f"{jobs.next_id()}.json"
    return jobs.submit("compare", " vs ".join(["base", *names]), [*args, "--report", str(report)], str(report.relative_to(workspace.root)))


def _export_job(workspace: Workspace, jobs: Jobs, body: dict, base_model: str) -> Job:
    known = dict(workspace.adapters())
    name, fmt = body.get("adapter"), body.get("format") or "gguf-lora"
    if not isinstance(name, str) or name not in known:
        raise ApiError(400, f"adapter: name a trained adapter of this studio ({', '.join(known) or 'none yet'})", param="adapter")
    if not isinstance(fmt, str) or fmt not in EXPORT_FORMATS:
        raise ApiError(400, f"format: one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})", param="format")
    target = workspace.exports / jobs.next_id() / f"{name}-{fmt}"
    return jobs.submit("export", f"{name} -> {fmt}", ["export", "--model-path", str(known[name]), "--format", fmt, "--output", str(target)],
                       str(target.relative_to(workspace.root)))
