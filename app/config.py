"""One typed configuration object for the whole product.

Every field can be set three ways, later wins: its default, an environment variable (`KTO_LOOP_<FIELD>`), and a
CLI flag (`--field-name`). The packages below `app` never read this object: the app hands each one the plain
values it needs, so `feedback_store`, `aligner` and `serving` stay usable on their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from aligner import config as aligner_config
from aligner.layers import parse_first_layer

ENV_PREFIX = "KTO_LOOP_"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "secret": secret})


def _aligner(name: str, *, old_env: str | None = None) -> Any:
    """A setting the app forwards to the aligner as its flag of the same name: default, help, choices and range
    are the aligner's own declaration (aligner/config.py). `old_env`: an earlier env var name still read."""
    meta = aligner_config.SETTINGS[name].metadata
    return field(default=aligner_config.default(name),
                 metadata={"help": meta["help"], "choices": meta["choices"], "secret": False, "aligner": name,
                           "old_env": old_env})


@dataclass
class Config:
    # Where things live. Empty paths are derived from `home` in `resolved()`.
    home: Path = _opt(Path("~/.cache/kto-loop"), "project home: models, data, adapters, logs")
    model_dir: Path | None = _opt(None, "local Hugging Face model directory to serve and align "
                                        "(default: the embedded SmolLM2-135M-Instruct under HOME/models)")
    data_dir: Path | None = _opt(None, "data directory (default: HOME/data)")
    db_path: Path | None = _opt(None, "DuckDB file of the feedback store (default: DATA_DIR/feedback.duckdb)")
    db_url: str = _opt("", "postgresql://user:password@host:port/db: keep the feedback store on PostgreSQL instead of "
                           "the DuckDB file, so several app processes can write it at once (empty = the DuckDB file; "
                           "docs/deploy.md)", secret=True)
    replica_sync_s: float = _opt(5.0, "with db_url: every N seconds each app process keeps or takes the store's "
                                      "leader lease (only its holder runs scheduled and operator realignment) and "
                                      "serves the adapter version the store names, so a promotion or rollback made "
                                      "by another app process reaches it within N s; with vllm_router_url the "
                                      "leader also checks the vLLM replicas this often (docs/deploy.md)")
    dashboard_copy_s: float = _opt(30.0, "with db_url: the console's counts, charts and next-run numbers come from "
                                         "a DuckDB copy of the store's ratings, runs and adapters (under DATA_DIR/"
                                         "dashboard), made again in the background when a console refresh finds it "
                                         "older than N s; 0 = query PostgreSQL on every refresh (docs/deploy.md)")
    adapter_dir: Path | None = _opt(None, "where adapter versions are kept (default: DATA_DIR/adapters)")
    deployment: str = _opt("default", "deployment name recorded with every answer and rating")

    # Network.
    host: str = _opt("127.0.0.1", "address the Gradio app listens on")
    port: int = _opt(7860, "port of the Gradio app")
    vllm_host: str = _opt("127.0.0.1", "address the vLLM server listens on; loopback unless "
                                       "vllm_allow_remote_host")
    vllm_allow_remote_host: bool = _opt(False, "let vllm_host be a non-loopback address: whoever reaches it can "
                                               "chat with every adapter (its API key still guards loading them)")
    vllm_port: int = _opt(8000, "port of the vLLM server (0 = pick a free one)")
    vllm_router_url: str = _opt("", "URL of a vllm-router in front of vLLM replicas you run yourself "
                                    "(docs/deploy.md); empty = the app starts and supervises its own vLLM server")
    vllm_replica_urls: str = _opt("", "with vllm_router_url: comma-separated URLs of the vLLM replicas behind it; a "
                                      "new adapter version is loaded and warmed on each before it is served")
    vllm_api_key: str = _opt("", "with vllm_router_url: the --api-key the vLLM replicas were started with",
                             secret=True)

    # vLLM server flags.
    vllm_max_lora_rank: int = _opt(aligner_config.default("max_lora_rank"),
                                   "vLLM --max-lora-rank; adapters above it are refused")
    vllm_max_loras: int = _opt(3, "vLLM --max-loras: adapters in one batch (current, previous, incoming)")
    vllm_max_cpu_loras: int = _opt(8, "vLLM --max-cpu-loras: adapters kept in memory, so candidates a run loads "
                                      "and the gate refuses do not evict the current or previous version")
    vllm_max_model_len: int = _opt(2048, "vLLM --max-model-len")
    vllm_dtype: str = _opt("auto", "vLLM --dtype; auto = bfloat16 where the CPU has native bf16 "
                                    "(AVX512-BF16, AMX), else float32; on GPU builds vLLM's own auto")
    vllm_kvcache_gb: int = _opt(2, "VLLM_CPU_KVCACHE_SPACE in GiB (CPU builds)")
    vllm_reserved_cpus: int = _opt(-1, "VLLM_CPU_NUM_OF_RESERVED_CPU: cores kept out of the model's thread pool "
                                       "(CPU builds); -1 = 0 on machines with 2 cores or fewer, else vLLM's default")
    vllm_max_num_batched_tokens: int = _opt(0, "vLLM --max-num-batched-tokens: tokens per engine step; 0 = 64 per "
                                               "core (at least 128) on CPU builds, vLLM's default on GPU builds")
    vllm_block_size: int = _opt(0, "vLLM --block-size: KV-cache tokens per block, the unit its prefix cache reuses; "
                                   "0 = 32 on CPU builds (vLLM-cpu's default is 128), vLLM's default on GPU builds")
    vllm_scheduling_policy: str = _opt("priority", "vLLM --scheduling-policy; priority lets an adapter's warm-up "
                                                   "request go ahead of queued chats", choices=("priority", "fcfs"))
    background_while_chatting: int = _opt(2, "the product's own requests (capability probes) in flight at once "
                                             "while people chat; vLLM's priority cannot hold back running ones "
                                             "(0 = no limit)")
    vllm_tensor_parallel: int = _opt(1, "vLLM --tensor-parallel-size (GPU builds)")
    vllm_data_parallel: int = _opt(1, "vLLM --data-parallel-size: engines behind one server, each with its own "
                                      "copy of the model (several GPUs on one node; a runtime adapter reaches all)")
    vllm_extra_args: str = _opt("", "extra flags passed verbatim to the vLLM server")
    vllm_start_timeout: float = _opt(300.0, "seconds to wait for the vLLM server to become ready")

    # Chat defaults.
    system_prompt: str = _opt("You are a helpful assistant.", "default system prompt (operators can change it)")
    temperature: float = _opt(0.7, "sampling temperature for chat answers")
    top_p: float = _opt(0.95, "nucleus sampling for chat answers")
    max_tokens: int = _opt(128, "maximum answer length in tokens: a realignment trains on the answers, and 128 keeps "
                                "a cycle of 400 ratings under 10 minutes on 2 cores (the default model's longer "
                                "answers mostly ramble)")
    max_message_chars: int = _opt(4000, "longest user message accepted")
    ratings_per_minute: int = _opt(60, "per-user rating rate limit")

    # Raters: who they are and how much one of them, or one client address, can do (0 = no limit).
    trusted_proxies: str = _opt("", "comma-separated addresses/networks of reverse proxies whose X-Forwarded-For "
                                    "(and sign-in header) are believed; empty = none: the socket peer is the client")
    rater_user_header: str = _opt("", "header a trusted proxy sets to the signed-in rater's name (e.g. "
                                      "X-Forwarded-User); ratings are then recorded as user:NAME; empty = "
                                      "anonymous raters only")
    messages_per_minute: int = _opt(20, "per-rater limit on messages and regenerations")
    address_messages_per_minute: int = _opt(60, "per-client-address limit on messages and regenerations")
    address_ratings_per_minute: int = _opt(120, "per-client-address rating rate limit")
    address_new_ids_per_hour: int = _opt(10, "new anonymous rater ids one client address gets per hour (also the "
                                             "burst); what stops one address from being many raters")
    sessions_per_address: int = _opt(20, "chat sessions kept per client address; a new one past it replaces that "
                                         "address's least recently used one, never another address's")

    # Alignment and schedule.
    schedule_interval_minutes: int = _opt(0, "realign every N minutes (0 = no interval schedule)")
    schedule_cron: str = _opt("", "crontab expression for realignment, e.g. '0 3 * * *' (empty = none)")
    min_new_ratings: int = _opt(50, "a scheduled run starts only after this many new ratings")
    align_mode: str = _opt("continue", "continue: train the served adapter further on the ratings it has not "
                                       "seen (reference = base); fresh: a new adapter on all ratings",
                           choices=("continue", "fresh"))
    max_examples: int = _opt(2000, "most examples used by one run (newest first)")
    lora_rank: int = _aligner("lora_rank")
    first_lora_layer: str = _aligner("first_lora_layer")
    beta: float = _aligner("beta")
    anchor_weight: float = _aligner("anchor_weight")
    anchor_max_tokens: int = _aligner("anchor_max_tokens", old_env="KTO_LOOP_ANCHOR_TOKENS")
    lr_generation_decay: float = _aligner("lr_generation_decay")
    promote_min_gain: float = _opt(0.0, "promotion gate: held-out margin gain the new adapter must exceed")
    promote_max_capability_drop: float = _opt(0.05, "capability guard: the largest share of the shipped factual "
                                                    "questions a new adapter may lose against the base model, "
                                                    "not the served adapter (bounded over any number of cycles; "
                                                    "asked at temperature 0 before the swap; negative = off)")
    promote_max_loop_increase: float = _opt(0.05, "loop check: the largest share of the shipped open prompts a new "
                                                  "adapter may answer by looping on one sentence beyond the base "
                                                  "model's count (answered with the served sampling before the "
                                                  "swap; negative = off; part of the capability guard, off "
                                                  "with it)")
    align_extra_args: str = _opt("", "extra flags passed verbatim to the aligner subprocess (e.g. '--max-steps 2')")
    align_timeout_s: float = _opt(0.0, "an aligner or checkpoint-evaluation child still running after this many "
                                       "seconds is stopped and the run fails (0 = scaled to the run: a start-up "
                                       "allowance plus a bound per example and epoch, app/loop/realign.py)")
    align_max_memory_gb: float = _opt(0.0, "an aligner child whose processes together hold more resident memory "
                                           "than this is stopped and the run fails (0 = half the machine's memory; "
                                           "negative = no cap)")
    device: str = _aligner("device")
    gpu_memory_fraction: float = _aligner("gpu_memory_fraction")
    max_user_share: float = _opt(0.1, "the largest share of a training snapshot one rater identity may supply; an "
                                      "over-cap rater keeps their newest ratings (0 = no cap). A tenth: one rater "
                                      "cannot steer a run, and a population of 10+ raters loses nothing")
    max_addr_share: float = _opt(0.2, "the largest share of a training snapshot one client address may supply "
                                      "(0 = no cap); looser than per identity because an office or NAT puts "
                                      "several honest raters behind one address")

    # Backups of the feedback database.
    backup_interval_hours: float = _opt(24.0, "take an online backup of the feedback database every N hours into "
                                              "DATA_DIR/backups, counted from the newest one there (0 = off)")
    backup_keep: int = _opt(7, "automatic backups kept; older ones are deleted")
    retention_days: float = _opt(0.0, "conversations with no activity (message, answer, rating change) for this many "
                                      "days are deleted with their ratings, at start-up and daily (aggregate counts "
                                      "are kept for audit; 0 = kept for ever)")

    # Logs.
    log_format: str = _opt("text", "text: human-readable lines; json: one JSON object per line (time, level, "
                                   "logger, message and the record's extra fields) for log collectors",
                           choices=("text", "json"))

    # Operator console.
    admin_user: str = _opt("admin", "operator console user name")
    admin_password: str = _opt("", "operator console password (empty = a random one, printed at start-up)",
                               secret=True)

    def resolved(self) -> Config:
        """A copy with every derived path filled in and `~` expanded."""
        home = Path(self.home).expanduser()
        data = Path(self.data_dir).expanduser() if self.data_dir else home / "data"
        return dataclasses.replace(
            self,
            home=home,
            model_dir=Path(self.model_dir).expanduser() if self.model_dir else home / "models" / DEFAULT_MODEL_NAME,
            data_dir=data,
            db_path=Path(self.db_path).expanduser() if self.db_path else data / "feedback.duckdb",
            adapter_dir=Path(self.adapter_dir).expanduser() if self.adapter_dir else data / "adapters",
        )

    @property
    def store_location(self) -> str | Path:
        """What FeedbackStore opens: the PostgreSQL URL when one is set, else the DuckDB file."""
        return self.db_url or self.db_path

    @property
    def uses_default_model(self) -> bool:
        return self.model_dir is None or Path(self.model_dir).expanduser() == (
            Path(self.home).expanduser() / "models" / DEFAULT_MODEL_NAME)

    def public_dict(self) -> dict[str, Any]:
        """Fields as JSON-able values, secrets masked (for logs and the console)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _base_type(tp: Any) -> type:
    """`Path | None` → Path; `int` → int."""
    args = getattr(tp, "__args__", None)
    if args:
        return next(a for a in args if a is not type(None))
    return tp


def _parse(tp: type, raw: str) -> Any:
    if tp is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    return tp(raw)


def add_config_arguments(parser: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """Add one flag per Config field; defaults are left to `config_from`, so env vars still apply.

    A flag the command already has (`kto-loop align --beta`) is not added again: its value sets the setting too.
    `hidden`: accepted but left out of the command's help."""
    hints = get_type_hints(Config)
    group = parser.add_argument_group("configuration (each flag also reads the env var shown)")
    shared: dict[str, str] = {}
    for f in dataclasses.fields(Config):
        own = parser._option_string_actions.get(_flag(f.name))
        if own is not None:
            shared[f.name] = own.dest
            continue
        tp = _base_type(hints[f.name])
        group.add_argument(
            _flag(f.name), dest=f"cfg_{f.name}", type=lambda raw, tp=tp: _parse(tp, raw), default=argparse.SUPPRESS,
            metavar=tp.__name__.upper(), choices=f.metadata.get("choices"),
            help=argparse.SUPPRESS if hidden else
            f"{f.metadata['help']} [env {_env(f.name)}; default {f.default!r}]".replace("%", "%%"),
        )
    parser.set_defaults(_cfg_shared=shared)


def config_from(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None) -> Config:
    """Build the resolved Config from defaults, then env vars, then parsed CLI flags."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(Config)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        tp = _base_type(hints[f.name])
        raw = environ.get(_env(f.name)) or environ.get(f.metadata.get("old_env") or _env(f.name))
        if raw is not None and raw != "":
            try:
                values[f.name] = _parse(tp, raw)
            except ValueError as e:
                raise SystemExit(f"kto-loop: bad value for {_env(f.name)}={raw!r}: {e}") from None
        dest = getattr(args, "_cfg_shared", {}).get(f.name, f"cfg_{f.name}")
        flag_value = getattr(args, dest, None) if args is not None else None
        if flag_value is not None:
            values[f.name] = flag_value
    cfg = Config(**values).resolved()
    try:
        parse_first_layer(cfg.first_lora_layer)
    except ValueError as e:
        raise SystemExit(f"kto-loop: {e}") from None
    forwarded = {f.metadata["aligner"]: (f.name, getattr(cfg, f.name))
                 for f in dataclasses.fields(Config) if f.metadata.get("aligner")}
    for aligner_name, rule in aligner_config.problems({k: v for k, (_, v) in forwarded.items()}):
        name, value = forwarded[aligner_name]
        raise SystemExit(f"kto-loop: {name} {rule}, got {value}")
    if cfg.lora_rank > cfg.vllm_max_lora_rank:
        raise SystemExit(f"kto-loop: lora_rank {cfg.lora_rank} is above vllm_max_lora_rank {cfg.vllm_max_lora_rank}: "
                         "vLLM would refuse every adapter")
    if not (math.isfinite(cfg.retention_days) and cfg.retention_days >= 0):
        raise SystemExit(f"kto-loop: retention_days must be a number of days ≥ 0 (0 = kept for ever), "
                         f"got {cfg.retention_days}")
    if not (math.isfinite(cfg.align_timeout_s) and cfg.align_timeout_s >= 0):
        raise SystemExit(f"kto-loop: align_timeout_s must be a number of seconds ≥ 0 (0 = scaled to the run), "
                         f"got {cfg.align_timeout_s}")
    if not math.isfinite(cfg.align_max_memory_gb):
        raise SystemExit(f"kto-loop: align_max_memory_gb must be a finite number, got {cfg.align_max_memory_gb}")
    if not (math.isfinite(cfg.replica_sync_s) and cfg.replica_sync_s > 0):
        raise SystemExit(f"kto-loop: replica_sync_s must be a number of seconds > 0, got {cfg.replica_sync_s}")
    if not (math.isfinite(cfg.dashboard_copy_s) and (cfg.dashboard_copy_s == 0 or cfg.dashboard_copy_s >= 1)):
        raise SystemExit(f"kto-loop: dashboard_copy_s must be 0 (off) or a number of seconds ≥ 1, got "
                         f"{cfg.dashboard_copy_s}")
    if cfg.db_url and not cfg.db_url.startswith(("postgresql://", "postgres://")):
        raise SystemExit("kto-loop: db_url must be a postgresql:// URL (or empty for the DuckDB file)")
    for proxy in filter(None, (p.strip() for p in cfg.trusted_proxies.split(","))):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError as e:
            raise SystemExit(f"kto-loop: trusted_proxies: {e}") from None
    if bool(cfg.vllm_router_url) != bool(replica_urls(cfg)):
        raise SystemExit("kto-loop: vllm_router_url and vllm_replica_urls go together: the router spreads chats, "
                         "the replica URLs are where each adapter version is loaded (docs/deploy.md)")
    for url in ([cfg.vllm_router_url] if cfg.vllm_router_url else []) + replica_urls(cfg):
        if not re.fullmatch(r"https?://[^\s/]+(:\d+)?/?", url):
            raise SystemExit(f"kto-loop: {url!r} is not an http(s)://host:port URL (vllm_router_url, "
                             "vllm_replica_urls)")
    if not cfg.vllm_allow_remote_host:
        from serving.server import is_loopback_host

        if not is_loopback_host(cfg.vllm_host):
            raise SystemExit(f"kto-loop: vllm_host {cfg.vllm_host} is not a loopback address and vLLM's API is for "
                             "this app only; set --vllm-allow-remote-host true to listen there anyway")
    return cfg


def replica_urls(cfg: Config) -> list[str]:
    """vllm_replica_urls as a list."""
    return [u.strip() for u in cfg.vllm_replica_urls.split(",") if u.strip()]
