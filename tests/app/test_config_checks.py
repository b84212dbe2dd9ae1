"""Start-up refuses settings that would only fail later, inside a run or at an adapter load."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import config_from
from app.loop.realign import Realigner


@pytest.mark.parametrize("env, says", [
    ({"KTO_LOOP_LORA_RANK": "32"}, "vllm_max_lora_rank"),
    ({"KTO_LOOP_ALIGN_TIMEOUT_S": "-1"}, "align_timeout_s"),
    ({"KTO_LOOP_ALIGN_TIMEOUT_S": "nan"}, "align_timeout_s"),
    ({"KTO_LOOP_RETENTION_DAYS": "-1"}, "retention_days"),
    ({"KTO_LOOP_RETENTION_DAYS": "nan"}, "retention_days"),
    ({"KTO_LOOP_ALIGN_MAX_MEMORY_GB": "inf"}, "align_max_memory_gb"),
    ({"KTO_LOOP_TRUSTED_PROXIES": "10.0.0.0/8,not-an-address"}, "trusted_proxies"),
    ({"KTO_LOOP_DB_URL": "mysql://db/kto"}, "db_url"),
    ({"KTO_LOOP_DASHBOARD_COPY_S": "0.1"}, "dashboard_copy_s"),
    ({"KTO_LOOP_DASHBOARD_COPY_S": "-5"}, "dashboard_copy_s"),
    ({"KTO_LOOP_DASHBOARD_COPY_S": "inf"}, "dashboard_copy_s"),
    ({"KTO_LOOP_VLLM_ROUTER_URL": "http://router:30000"}, "vllm_replica_urls"),
    ({"KTO_LOOP_VLLM_REPLICA_URLS": "http://a:8000,http://b:8000"}, "vllm_router_url"),
    ({"KTO_LOOP_VLLM_ROUTER_URL": "http://router:30000", "KTO_LOOP_VLLM_REPLICA_URLS": "a:8000"}, "a:8000"),
    ({"KTO_LOOP_VLLM_ROUTER_URL": "router", "KTO_LOOP_VLLM_REPLICA_URLS": "http://a:8000"}, "router"),
    ({"KTO_LOOP_DEVICE": "tpu"}, "device"),
    ({"KTO_LOOP_GPU_MEMORY_FRACTION": "1.5"}, "gpu_memory_fraction"),
])
def test_a_setting_that_can_only_fail_later_stops_the_start(env, says):
    with pytest.raises(SystemExit, match=says):
        config_from(environ=env)


def test_the_aligner_is_told_the_servers_rank_limit(tmp_path: Path):
    cfg = config_from(environ={"KTO_LOOP_LORA_RANK": "32", "KTO_LOOP_VLLM_MAX_LORA_RANK": "64"})
    r = Realigner(None, None, model_dir=tmp_path, work_dir=tmp_path, lora_rank=cfg.lora_rank,
                  max_lora_rank=cfg.vllm_max_lora_rank)
    cmd = r.command(tmp_path / "s.parquet", tmp_path / "out", None)
    assert cmd[cmd.index("--lora-rank") + 1] == "32" and cmd[cmd.index("--max-lora-rank") + 1] == "64"


def test_the_aligner_is_told_its_device_and_its_share_of_the_gpu(tmp_path: Path):
    cfg = config_from(environ={"KTO_LOOP_DEVICE": "cuda", "KTO_LOOP_GPU_MEMORY_FRACTION": "0.4"})
    r = Realigner(None, None, model_dir=tmp_path, work_dir=tmp_path, device=cfg.device,
                  gpu_memory_fraction=cfg.gpu_memory_fraction)
    cmd = r.command(tmp_path / "s.parquet", tmp_path / "out", None)
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--gpu-memory-fraction") + 1] == "0.4"
    cfg = config_from(environ={})
    assert (cfg.device, cfg.gpu_memory_fraction) == ("auto", 0.0)  # the aligner's own defaults
    r = Realigner(None, None, model_dir=tmp_path, work_dir=tmp_path, device=cfg.device,
                  gpu_memory_fraction=cfg.gpu_memory_fraction)
    cmd = r.command(tmp_path / "s.parquet", tmp_path / "out", None)
    assert "--device" not in cmd and "--gpu-memory-fraction" not in cmd
    with pytest.raises(ValueError, match="device"):
        Realigner(None, None, model_dir=tmp_path, work_dir=tmp_path, device="gpu")


def test_the_store_is_the_duckdb_file_unless_a_postgres_url_is_set():
    cfg = config_from(environ={"KTO_LOOP_HOME": "/srv/kto"})
    assert cfg.store_location == Path("/srv/kto/data/feedback.duckdb")
    url = "postgresql://kto:s3cret@db.internal/kto"
    cfg = config_from(environ={"KTO_LOOP_HOME": "/srv/kto", "KTO_LOOP_DB_URL": url})
    assert cfg.store_location == url and cfg.public_dict()["db_url"] == "***"


def test_the_replicas_behind_a_router_are_read_as_a_list():
    from app.config import replica_urls

    cfg = config_from(environ={"KTO_LOOP_VLLM_ROUTER_URL": "http://r:30000",
                               "KTO_LOOP_VLLM_REPLICA_URLS": " http://a:8000, http://b:8000/ ,"})
    assert replica_urls(cfg) == ["http://a:8000", "http://b:8000/"]
