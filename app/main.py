"""Wiring: vLLM server + feedback store + adapter registry + realigner (`build_stack`), then the web app on top.

`build_stack(cfg)` is shared by `kto-loop run` and the simulator. `create_app` mounts the chat page at "/", the
operator console at "/admin" and the operator JSON API at "/api/admin" (both behind admin basic auth) in one
FastAPI app. `serve(cfg)` runs it all until Ctrl-C and tears everything down in reverse order, so no vLLM
process outlives the app.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Config, replica_urls
from app.logs import configure_logging, json_logging, say, uvicorn_log_config
from app.loop.realign import Realigner
from app.operator_settings import RUNTIME_FILE, OperatorSettings, SettingsStore, write_json_atomic


@dataclass
class Stack:
    server: Any           # serving.server.VLLMServer, or serving.replicas.ReplicaSet behind a router
    store: Any            # feedback_store.FeedbackStore
    registry: Any         # serving.registry.AdapterRegistry
    client: Any           # serving.client.ChatClient
    realigner: Realigner
    settings: SettingsStore
    cfg: Config
    dashboard: Any = None  # feedback_store.mirror.DashboardCopy on PostgreSQL (dashboard_copy_s > 0)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_settings(cfg: Config) -> OperatorSettings:
    return OperatorSettings(interval_minutes=cfg.schedule_interval_minutes, cron=cfg.schedule_cron,
                            min_new_ratings=cfg.min_new_ratings, max_examples=cfg.max_examples,
                            system_prompt=cfg.system_prompt)


def server_spec(cfg: Config):
    from serving.server import VLLMServerSpec

    return VLLMServerSpec(
        model_dir=Path(cfg.model_dir), host=cfg.vllm_host, allow_remote=cfg.vllm_allow_remote_host,
        port=cfg.vllm_port or _free_port(cfg.vllm_host),
        max_lora_rank=cfg.vllm_max_lora_rank, max_loras=cfg.vllm_max_loras,
        max_cpu_loras=cfg.vllm_max_cpu_loras, max_model_len=cfg.vllm_max_model_len,
        dtype=cfg.vllm_dtype, kvcache_gb=cfg.vllm_kvcache_gb, tensor_parallel=cfg.vllm_tensor_parallel,
        data_parallel=cfg.vllm_data_parallel,
        reserved_cpus=cfg.vllm_reserved_cpus, max_num_batched_tokens=cfg.vllm_max_num_batched_tokens,
        block_size=cfg.vllm_block_size, scheduling_policy=cfg.vllm_scheduling_policy,
        extra_args=tuple(shlex.split(cfg.vllm_extra_args)), start_timeout=cfg.vllm_start_timeout,
        log_path=Path(cfg.data_dir) / "vllm.log")


def serving_for(cfg: Config):
    """The app's own supervised vLLM server, or the replicas behind a router the operator runs (docs/deploy.md)."""
    if cfg.vllm_router_url:
        from serving.replicas import ReplicaSet

        return ReplicaSet(cfg.vllm_router_url, replica_urls(cfg), api_key=cfg.vllm_api_key or None)
    from serving.server import VLLMServer

    return VLLMServer(server_spec(cfg))


def served_model_name(server: Any) -> str:
    """The name vLLM serves the base model under (`--served-model-name`)."""
    spec = getattr(server, "spec", None)
    return spec.served_model_name if spec is not None else server.served_model_name


@contextlib.contextmanager
def build_stack(cfg: Config) -> Iterator[Stack]:
    """Open the store, start vLLM (LoRA on), restore the served adapter; stop everything on exit."""
    from feedback_store import FeedbackStore
    from serving.admission import Admission
    from serving.client import ChatClient
    from serving.registry import AdapterRegistry

    cfg = cfg.resolved() if cfg.data_dir is None else cfg
    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.adapter_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        store = FeedbackStore(cfg.store_location, deployment=cfg.deployment, verify=True,
                              max_user_share=cfg.max_user_share or None, max_addr_share=cfg.max_addr_share or None)
        stack.callback(_close, store)
        if cfg.backup_interval_hours > 0 and not cfg.db_url:   # PostgreSQL: the server's backups (docs/deploy.md)
            from feedback_store import PeriodicBackup, default_backup_dir

            backups = PeriodicBackup(store, default_backup_dir(cfg.db_path), cfg.backup_interval_hours * 3600,
                                     cfg.backup_keep).start()
            stack.callback(backups.stop)
        server = serving_for(cfg)
        stack.callback(server.stop)  # registered first: a Ctrl-C during start-up still stops the child
        own = not cfg.vllm_router_url  # the app starts and supervises its vLLM server
        if own:
            say(f"starting vLLM with {cfg.model_dir} (log: {getattr(server, 'log_path', '-')}); the first start "
                "takes 1-3 minutes …", model_dir=str(cfg.model_dir), vllm_log=str(getattr(server, 'log_path', '-')))
        started = time.monotonic()
        server.start()
        if own:
            say(f"vLLM is ready ({time.monotonic() - started:.0f} s)", seconds=round(time.monotonic() - started, 1))
        else:
            say(f"chats go through the vLLM router at {server.base_url} to {len(server.replicas)} replicas",
                router=server.base_url, replicas=list(server.replicas))
        admission = Admission(cfg.background_while_chatting) if cfg.background_while_chatting > 0 else None
        client = ChatClient(server.base_url, admission=admission, api_key=server.api_key)
        registry = AdapterRegistry(server, Path(cfg.adapter_dir), max_lora_rank=cfg.vllm_max_lora_rank,
                                   base_model_dir=None if own else cfg.model_dir)  # own: the server's spec says
        from app.loop.served import reconcile

        shared = bool(cfg.db_url)  # other app processes may use the store (served.py's docstring)
        registry.sync_replicas()   # replicas behind a router: each holds the served versions before it takes chats
        reconcile(store, registry, shared=shared)  # vLLM serves what the store says; a fallback is recorded too
        if own:
            server.add_restart_hook(lambda: reconcile(store, registry, shared=shared))
        settings = SettingsStore(cfg.data_dir, default_settings(cfg))
        guard = promotion_guard(cfg, server, settings, admission)
        realigner = Realigner(
            store, registry, model_dir=Path(cfg.model_dir), work_dir=Path(cfg.data_dir) / "runs",
            lora_rank=cfg.lora_rank, max_lora_rank=cfg.vllm_max_lora_rank, beta=cfg.beta, min_gain=cfg.promote_min_gain,
            max_examples=cfg.max_examples,
            extra_args=shlex.split(cfg.align_extra_args), mode=cfg.align_mode, capability_guard=guard,
            anchor_weight=cfg.anchor_weight, anchor_max_tokens=cfg.anchor_max_tokens,
            first_lora_layer=cfg.first_lora_layer,
            anchor_cache=Path(cfg.home) / "cache" / "anchors", lr_generation_decay=cfg.lr_generation_decay,
            timeout_s=cfg.align_timeout_s, max_memory_bytes=memory_cap_bytes(cfg.align_max_memory_gb),
            device=cfg.device, gpu_memory_fraction=cfg.gpu_memory_fraction)
        stack.callback(realigner.close)
        dashboard = None
        if cfg.db_url and cfg.dashboard_copy_s > 0:
            from feedback_store.mirror import DashboardCopy

            dashboard = DashboardCopy.own_folder(store, Path(cfg.data_dir) / "dashboard", cfg.dashboard_copy_s)
            stack.callback(dashboard.close)
        yield Stack(server, store, registry, client, realigner, settings, cfg, dashboard)


def promotion_guard(cfg: Config, server: Any, settings: SettingsStore, admission: Any = None) -> Any:
    """The gate's check between loading a candidate and switching to it: the capability probe (greedy, short) and
    the loop check (open prompts, answered with the served sampling); None when the capability guard is off."""
    if cfg.promote_max_capability_drop < 0:
        return None
    from app.loop.gate import CapabilityGuard, http_ask, load_capability, load_open_prompts
    from serving.server import request_priority

    how: dict[str, Any] = dict(system_prompt=lambda: settings.load().system_prompt, admission=admission,
                               priority=request_priority(server, "background"), api_key=server.api_key)
    loops = cfg.promote_max_loop_increase >= 0
    return CapabilityGuard(
        http_ask(server.base_url, **how), load_capability(), cfg.promote_max_capability_drop,
        base=served_model_name(server), max_loop_increase=cfg.promote_max_loop_increase,
        sample=http_ask(server.base_url, sampling=sampling_for(cfg).to_request(), **how) if loops else None,
        open_prompts=load_open_prompts() if loops else ())


def memory_cap_bytes(gb: float) -> int | None:
    """align_max_memory_gb as the Realigner takes it: 0 = its default cap, negative = none."""
    return None if gb < 0 else int(gb * 2**30)


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if close:
        close()


# ---------------------------------------------------------------- the web app

def sampling_for(cfg: Config):
    from serving.client import SamplingParams

    return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)


def create_app(st: Stack, admin_password: str, *, console_refresh_s: float = 3.0):
    """FastAPI app with chat at "/", console at "/admin", operator API at "/api/admin"; returns (app, scheduler)."""
    import gradio as gr
    from fastapi import FastAPI

    from app.loop.scheduler import RealignScheduler
    from app.web.admin_api import AdminRequestGuard, admin_router
    from app.web.auth import MAX_PUBLIC_BODY, SECRET_FILE, AuthMiddleware, buckets_for, raters_for
    from app.web.chat import CSS, ChatService, Limits, PromptTokens, build_chat_ui
    from app.web.console import CSS as CONSOLE_CSS
    from app.web.console import Operator, build_console

    cfg = st.cfg
    scheduler = RealignScheduler(st.realigner, st.store, st.settings, retention_days=cfg.retention_days,
                                 **replica_loop(st))
    op = Operator(st.store, st.registry, st.realigner, scheduler, st.settings, dashboard=st.dashboard)
    buckets = buckets_for(st.store, shared=bool(cfg.db_url))   # replicas on one store share every rate limit
    service = ChatService(st.store, st.client, st.registry, system_prompt=lambda: st.settings.load().system_prompt,
                          sampling=lambda: sampling_for(cfg), max_chars=cfg.max_message_chars,
                          ratings_per_minute=cfg.ratings_per_minute,
                          health=lambda: st.server.is_healthy(timeout=2.0),
                          limits=Limits(messages_per_minute=cfg.messages_per_minute,
                                        address_messages_per_minute=cfg.address_messages_per_minute,
                                        address_ratings_per_minute=cfg.address_ratings_per_minute,
                                        sessions_per_address=cfg.sessions_per_address),
                          context_tokens=cfg.vllm_max_model_len, count_tokens=PromptTokens(cfg.model_dir),
                          buckets=buckets)
    raters = raters_for(Path(cfg.data_dir) / SECRET_FILE, trusted_proxies=cfg.trusted_proxies,
                        user_header=cfg.rater_user_header, new_ids_per_hour=cfg.address_new_ids_per_hour,
                        buckets=buckets)

    app = FastAPI(title="kto-loop", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AdminRequestGuard)  # added first, so AuthMiddleware (outermost) answers 401 first
    app.add_middleware(AuthMiddleware, admin_user=cfg.admin_user, admin_password=admin_password, raters=raters)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "server_ok": service.server_ok(), "served": st.registry.current(),
                "loop_leader": scheduler.leader}

    app.include_router(admin_router(st, op, scheduler))
    from app.web.admin_runs import runs_router

    app.include_router(runs_router(op))
    from app.web.metrics import metrics_router
    from app.web.openai_api import keys_router, openai_router

    app.include_router(openai_router(st.store, service, raters))   # OpenAI-compatible API for client apps
    app.include_router(keys_router(st.store))
    app.include_router(metrics_router(st, cfg.admin_user, admin_password))

    console = build_console(op, refresh_s=console_refresh_s)
    chat = build_chat_ui(service, raters)
    app = gr.mount_gradio_app(app, console, path="/admin", css=CSS + CONSOLE_CSS, footer_links=[])
    app = gr.mount_gradio_app(app, chat, path="/", css=CSS, footer_links=[], max_file_size=MAX_PUBLIC_BODY)
    return app, scheduler


def replica_loop(st: Stack) -> dict[str, Any]:
    """The scheduler's replica wiring: on a PostgreSQL store the leader lease and following the store's served
    version; behind a router, the leader's check of the vLLM replicas (app/loop/scheduler.py). Nothing for the
    embedded default: one process owns the DuckDB file and supervises its one vLLM server."""
    wiring: dict[str, Any] = {}
    if st.cfg.vllm_router_url:
        wiring.update(serving_sync=st.registry.sync_replicas, sync_s=st.cfg.replica_sync_s)
    if not st.cfg.db_url:
        return wiring
    from app.loop.served import follow
    from feedback_store.lease import LeaderLease

    return {**wiring, "lease": LeaderLease(st.store), "follow": lambda: follow(st.store, st.registry),
            "sync_s": st.cfg.replica_sync_s}


def serve(cfg: Config, *, ready: threading.Event | None = None, stop: threading.Event | None = None) -> int:
    """`kto-loop run`: everything up, serve until Ctrl-C (or `stop`), everything down."""
    import uvicorn

    from app.web.auth import new_password

    configure_logging(cfg.log_format)
    password = cfg.admin_password or new_password()
    with build_stack(cfg) as st:
        app, scheduler = create_app(st, password)
        scheduler.start()
        port = cfg.port or _free_port(cfg.host)
        server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=port, log_level="warning",
                                               log_config=uvicorn_log_config(cfg.log_format),
                                               proxy_headers=False,  # the client address is ours to derive
                                               timeout_graceful_shutdown=5))
        runtime = Path(st.cfg.data_dir) / RUNTIME_FILE
        url = f"http://{cfg.host}:{port}"
        write_json_atomic(runtime, {"url": url, "pid": os.getpid(), "admin_user": cfg.admin_user,
                                    "admin_password": password, "started_at": time.time(),
                                    "db_path": str(Path(st.cfg.db_path).resolve())}, mode=0o600)
        try:
            if json_logging():  # a collector keeps no password: it is in the runtime file (mode 0600)
                say(f"chat at {url}/  console at {url}/admin/  (user {cfg.admin_user!r}, password in {runtime})",
                    url=url, admin_user=cfg.admin_user)
            else:
                print(f"kto-loop: chat at {url}/  console at {url}/admin/  (user {cfg.admin_user!r}"
                      + ("" if cfg.admin_password else f", password {password!r}") + ")", flush=True)
            if stop is not None:
                threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)),
                                 daemon=True).start()
            if ready is not None:
                threading.Thread(target=_signal_when_started, args=(server, ready), daemon=True).start()
            server.run()
        finally:
            scheduler.shutdown()
            with contextlib.suppress(FileNotFoundError):
                runtime.unlink()
    return 0


def _signal_when_started(server, ready: threading.Event) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    ready.set()
