"""Start `banklora serve`: the adapters named on the command line, loaded once beside one base."""

from __future__ import annotations

import errno
import logging
import re
import signal
import socket
import threading
import time
from pathlib import Path

from banklora.config import SERVE_MAX_BATCH_SIZE
from banklora.errors import UsageError
from banklora.modeling import adapter_names, is_adapter_dir, load
from banklora.serve.app import Served, create_app
from banklora.inference.engine import Engine
from banklora.inference.fast_paths import ServingSettings, serving_quantize

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # PEFT adapter names are module keys: no dots
API_KEY_ENV = "BANKLORA_API_KEY"
GRACEFUL_S = 5  # seconds open connections get to finish when the server stops


def parse_model_paths(specs: list[str]) -> list[tuple[str, Path]]:
    """`--model-path DIR` or `--model-path name=DIR`, each an adapter directory, names unique."""
    pairs: list[tuple[str | None, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, Path(path)) if sep and not Path(spec).exists() else (None, Path(spec))
        if not is_adapter_dir(path):
            hint = "train one with `banklora train --output-dir DIR`; serve a base model alone with --base-model" if path.exists() else "no such directory"
            raise UsageError(f"--model-path {spec}: {path} is not a LoRA adapter directory (no adapter_config.json); {hint}")
        if name is not None and not _NAME.match(name):
            raise UsageError(f"--model-path {spec}: the name {name!r} may only hold letters, digits, '_' and '-' (at most 64)")
        pairs.append((name, path))
    defaults = adapter_names([str(p) for _, p in pairs])
    names = [n or re.sub(r"[^A-Za-z0-9_-]", "-", d) for (n, _), d in zip(pairs, defaults)]
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"--model-path: two adapters are named {name!r}; name them with --model-path NAME=DIR")
    return [(name, path) for name, (_, path) in zip(names, pairs)]


def build(model_paths: list[str], *, base_model: str | None = None, api_key: str | None = None, max_batch_size: int = SERVE_MAX_BATCH_SIZE,
          max_queue: int = 64, int8: bool = False, fp16: bool = False, quantize: str | None = None, device: str | None = None,
          dtype: str = "auto"):
    """Load the base and adapters (verified) and return the app and what it serves."""
    check_server_flags(api_key, max_batch_size, max_queue)
    int8_weights = serving_quantize(quantize)
    adapters = parse_model_paths(model_paths)
    check_servable(adapters)
    if fp16 and adapters:
        raise UsageError("--fp16 needs a plain model and the server keeps adapters unmerged (one base serves them all); "
                         "leave --fp16 out, or serve the base alone")
    names = tuple(name for name, _ in adapters)
    first, more = (str(adapters[0][1]), tuple(str(p) for _, p in adapters[1:])) if adapters else (base_model, ())
    loaded = load(first, base_model=base_model if adapters else None, more_adapters=more, names=names or None, device=device, dtype=dtype,
                  serve=ServingSettings(merge=not adapters, int8_head=int8, fp16_weights=fp16, stacked=bool(adapters),
                                                int8_weights=int8_weights), verify=True)
    served = Served(base=loaded.base.name, adapters=tuple(loaded.adapter_names), created=int(time.time()),
                    context=int(loaded.model.config.max_position_embeddings))
    if served.base in served.adapters:
        raise UsageError(f"--model-path: an adapter is named {served.base!r} like the base; name it with --model-path NAME=DIR")
    engine = Engine(loaded.model, loaded.tokenizer, peft=bool(adapters), max_batch_size=max_batch_size, max_queue=max_queue)
    return create_app(engine, loaded.tokenizer, served, api_key=api_key), served, loaded


def check_server_flags(api_key: str | None, max_batch_size: int, max_queue: int) -> None:
    """The flags serve and studio share, checked before anything loads."""
    if max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1 (got {max_batch_size})")
    if max_queue < 0:
        raise UsageError(f"--max-queue must be 0 or more (got {max_queue})")
    if api_key is not None and not api_key:
        raise UsageError(f"--api-key (or {API_KEY_ENV}) is empty; give a key, or leave both out to serve without one")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads: a port out of range or in use is a
    sentence at once, not uvicorn's traceback after a minute of loading; port 0 takes a free one."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0-65535 (got {port}); 0 picks a free port")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: not an address of this machine ({exc.strerror}); 127.0.0.1 serves this machine only") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = ("another program is listening there: stop it, or pick another port (--port 0 takes a free one)"
               if exc.errno == errno.EADDRINUSE else "choose another --host or --port")
        raise UsageError(f"--host {host} --port {port}: cannot listen ({exc.strerror}); {why}") from exc
    return sock


def check_servable(adapters: list[tuple[str, Path]]) -> None:
    """Refuse at start-up what the engine cannot answer with: DoRA adapters (PEFT computes them one
    adapter at a time, and the server batches requests of every model together)."""
    from banklora.modeling import adapter_config

    for name, path in adapters:
        if adapter_config(path).get("use_dora"):
            raise UsageError(f"--model-path {path}: a DoRA adapter cannot be served beside the base (PEFT applies DoRA to a whole batch, "
                             f"and the server batches every model's requests together); export it merged with `banklora export --model-path {path} "
                             f"--format hf` and serve that with --base-model, or talk to it with `banklora chat --model-path {path}`")


def run(app, served: Served, loaded, *, sock: socket.socket, api_key: str | None) -> None:
    import uvicorn

    host, port = sock.getsockname()[:2]  # the real port, when --port 0 let the system choose
    if host not in ("127.0.0.1", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who reaches this address can use the models; set --api-key or %s",
                    host, API_KEY_ENV)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s%s on %s, %s weights", served.base, "".join(f", {a}" for a in served.adapters), loaded.device,
             str(loaded.dtype).removeprefix("torch."))
    log.info("OpenAI API at http://%s:%d/v1, web chat at http://%s:%d/", shown, port, shown, port)
    # timeout_graceful_shutdown: open streams (a studio page's events, a chat answer) must not hold a stop back; the
    # app's shutdown (the engine, the studio's running job) follows
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACEFUL_S))
    engine = app.state.engine

    failed: list[BaseException] = []

    def http() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # raised again on the main thread, as when uvicorn ran there
            failed.append(exc)
        finally:
            engine.shutdown()  # also when the server could not start: the main thread's loop returns

    # The generation engine runs on the main thread and HTTP in a thread of its own (Engine.run_here: torch's
    # threads run a batched decoding step ~1.9x faster there). Signals reach the main thread: they ask uvicorn
    # to stop as its own handlers would (a second Ctrl-C: at once), and are raised again once it has stopped.
    caught: list[int] = []

    def on_signal(sig, frame) -> None:
        caught.append(sig)
        server.handle_exit(sig, frame)

    thread = threading.Thread(target=http, name="banklora-http", daemon=True)
    main = threading.current_thread() is threading.main_thread()  # only the main thread can take signals
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        engine.run_here(ready=thread.start)
    finally:
        server.should_exit = True  # already so when the loop ended by shutdown; if it failed, the app still shuts down
        if thread.is_alive():  # (a studio run keeps its checkpoint)
            thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise failed[0]
    for sig in reversed(caught):
        signal.raise_signal(sig)
