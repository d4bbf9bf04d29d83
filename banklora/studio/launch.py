"""Start `banklora studio`: the serve app (OpenAI API, web chat) with the studio's pages and jobs,
serving the base and every adapter trained in the workspace; an adapter whose training ends while
the server runs is loaded beside them at once (hot-loaded into the engine)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
import time
from pathlib import Path

from banklora.config import SERVE_MAX_BATCH_SIZE
from banklora.inference.engine import Engine
from banklora.inference.fast_paths import ServingSettings
from banklora.errors import BankloraError
from banklora.modeling import adapter_config, check_adapter, load, read_meta, resolve_base
from banklora.serve.app import Served, create_app
from banklora.serve.launch import check_server_flags
from banklora.studio.jobs import Jobs
from banklora.studio.routes import add_studio
from banklora.studio.workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE = "studio"


class Adapters:
    """The adapters the engine answers with, and the way to add one while it runs: the base and
    every adapter are loaded again beside the new one (a few seconds for the 270M model) and the
    engine switches to that model between two steps; answers in flight go on with the same weights."""

    def __init__(self, engine: Engine, served: Served, base_model: str, dtype: str, paths: dict[str, Path]) -> None:
        self.engine, self.served, self.base_model, self.dtype = engine, served, base_model, dtype
        self.paths = dict(paths)
        self._lock = threading.Lock()

    def add(self, name: str, path: Path) -> None:
        """Load `path` as `name` in the background (called by the job runner when a run ends)."""
        threading.Thread(target=self._add, args=(name, Path(path)), name=f"banklora-load-{name}", daemon=True).start()

    def _add(self, name: str, path: Path) -> None:
        with self._lock:
            if not servable(name, path):
                return
            paths = self.paths | {name: path}
            started = time.perf_counter()
            try:
                loaded = _load(self.base_model, paths, self.dtype)
            except Exception as exc:  # the run's adapter stays in the workspace; the chat goes on with the others
                log.error("studio: the adapter %s could not be loaded beside the others (%s); chat with it: banklora chat --model-path %s",
                          name, exc, path)
                return
            self.engine.replace_model(loaded.model, peft=True)
            self.paths = paths
            self.served.adapters = tuple(paths)
            log.info("studio: adapter %s loaded beside the base (%.1f s); it is in /v1/models and the chat", name, time.perf_counter() - started)


def servable(name: str, path: Path, base=None) -> bool:
    """An adapter the engine can answer with: of this base (checked when `base` is given: a damaged
    or foreign adapter in the workspace must not keep the studio from starting), and not DoRA
    (PEFT applies DoRA to a whole batch)."""
    try:
        if base is not None:
            check_adapter(path, read_meta(path), base)
        dora = adapter_config(path).get("use_dora")
    except BankloraError as exc:
        log.warning("studio: %s is not served: %s", name, exc)
        return False
    if dora:
        log.warning("studio: %s is a DoRA adapter and is not served beside the base; chat with it: banklora chat --model-path %s", name, path)
        return False
    return True


def _load(base_model: str, paths: dict[str, Path], dtype: str, verify: bool = False):
    if not paths:
        return load(base_model, dtype=dtype, serve=ServingSettings(merge=True), verify=verify)
    names, dirs = list(paths), [str(p) for p in paths.values()]
    return load(dirs[0], base_model=base_model, more_adapters=tuple(dirs[1:]), names=tuple(names), dtype=dtype,
                serve=ServingSettings(stacked=True), verify=verify)


def build(workspace_dir: str | Path, *, base_model: str, api_key: str | None = None, max_batch_size: int = SERVE_MAX_BATCH_SIZE, max_queue: int = 64,
          dtype: str = "auto", host: str = "127.0.0.1"):
    """The app, what it serves and what was loaded (its model left out: the engine owns the model,
    and replaces it as adapters arrive), for serve.launch.run."""
    check_server_flags(api_key, max_batch_size, max_queue)
    workspace = Workspace.open(Path(workspace_dir))
    base = resolve_base(base_model, verify=True)
    paths = {name: path for name, path in workspace.adapters() if servable(name, path, base)}
    loaded = _load(base_model, paths, dtype)
    served = Served(base=loaded.base.name, adapters=tuple(paths), created=int(time.time()),
                    context=int(loaded.model.config.max_position_embeddings))
    engine = Engine(loaded.model, loaded.tokenizer, peft=bool(paths), max_batch_size=max_batch_size, max_queue=max_queue)
    adapters = Adapters(engine, served, base_model, dtype, paths)
    jobs = Jobs(workspace, on_adapter=adapters.add)
    app = create_app(engine, loaded.tokenizer, served, api_key=api_key, services=(jobs,))
    hosts = allowed_hosts(host)
    add_studio(app, workspace, jobs, base_model, app.state.authorize, keyed=api_key is not None, hosts=hosts)
    app.state.jobs = jobs
    return app, served, dataclasses.replace(loaded, model=None)


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def allowed_hosts(host: str) -> frozenset[str] | None:
    """The Host names the studio answers to when it listens on `host`: this machine's names on a
    loopback address (a DNS name pointed here by another site is refused), the name itself when
    it listens on a name, any on another address (the key guards it there)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return LOOPBACK_NAMES if host == "localhost" else frozenset({host})
    return LOOPBACK_NAMES if address.is_loopback else None
