"""The scaled deployment of docs/deploy.md at small scale, as real processes: one PostgreSQL store, two vLLM
replicas (tiny model) behind the vLLM project's router, two `kto-loop run` processes. Chats and ratings go through
both apps (the OpenAI-compatible API), one realignment runs on the leader, its promotion reaches both replicas and
both apps, and a rollback made through the other app reaches the first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import free_port, wait_until
from tests.e2e.test_browser import HOLDOUT, seed_ratings

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
KEY = "scaled-deployment-test-key"



def _get(url: str, **kw) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5, **kw)
    except httpx.HTTPError:
        return None



def _metric(url: str, name: str) -> float:
    r = _get(f"{url}/metrics")
    assert r is not None and r.status_code == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines() if line.startswith(name + "{"))


def _cli(*args: str, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args, "--data-dir", str(data)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_two_apps_two_vllm_replicas_one_router_one_loop(tiny_model_dir, pg_url, tmp_path):
    from serving.server import VLLMServer, VLLMServerSpec

    replicas = [VLLMServer(VLLMServerSpec(model_dir=tiny_model_dir, port=0, max_lora_rank=16, api_key=KEY,
                                          log_path=tmp_path / f"vllm-{i}.log")) for i in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        starters = [threading.Thread(target=r.start) for r in replicas]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        urls = [r.base_url for r in replicas]
        router_port = free_port()
        router = f"http://127.0.0.1:{router_port}"
        procs.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "vllm-router"), "--host", "127.0.0.1", "--port", str(router_port),
             "--policy", "round_robin", "--worker-urls", *urls, "--log-level", "warning",
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
            stdout=open(tmp_path / "router.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        wait_until(lambda: (r := _get(f"{router}/list_workers")) is not None and r.status_code == 200, 60, "the router")
        seed_ratings(pg_url)
        from feedback_store import FeedbackStore

        with FeedbackStore(pg_url) as store:
            client_key, _ = store.create_api_key("webui")

        env = dict(os.environ, KTO_LOOP_ADMIN_PASSWORD="pw", KTO_LOOP_MAX_TOKENS="12", KTO_LOOP_LORA_RANK="8",
                   KTO_LOOP_ALIGN_EXTRA_ARGS=f"--max-steps 2 --batch-size 4 --holdout-fraction {HOLDOUT}",
                   KTO_LOOP_PROMOTE_MIN_GAIN="-1000", KTO_LOOP_PROMOTE_MAX_CAPABILITY_DROP="-1",
                   KTO_LOOP_MAX_USER_SHARE="0", KTO_LOOP_MAX_ADDR_SHARE="0", KTO_LOOP_BACKUP_INTERVAL_HOURS="0",
                   KTO_LOOP_VLLM_API_KEY=KEY)
        apps = []
        for name in ("a", "b"):
            data, port = tmp_path / name, free_port()
            cmd = [sys.executable, "-m", "app.cli", "run", "--model-dir", str(tiny_model_dir), "--data-dir", str(data),
                   "--port", str(port), "--db-url", pg_url, "--replica-sync-s", "1",
                   "--vllm-router-url", router, "--vllm-replica-urls", ",".join(urls)]
            data.mkdir()
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(data / "app.log", "w"),
                                          stderr=subprocess.STDOUT))
            apps.append((f"http://127.0.0.1:{port}", data))
        for (url, data), proc in zip(apps, procs[1:], strict=True):
            def up(url=url, proc=proc, data=data) -> bool:
                assert proc.poll() is None, (data / "app.log").read_text()[-3000:]
                return (r := _get(f"{url}/api/health")) is not None and r.status_code == 200
            wait_until(up, 300, f"the app at {url}")

        served_before = [_metric(u, "vllm:request_success_total") for u in urls]
        answers = []
        for i in range(8):                                   # chats and ratings through both apps
            url = apps[i % 2][0]
            oa = openai.OpenAI(base_url=url + "/v1", api_key=client_key, max_retries=0, timeout=60)
            done = oa.chat.completions.create(model="kto-loop", user=f"u{i}",
                                              messages=[{"role": "user", "content": f"Question number {i}?"}])
            r = httpx.post(url + "/v1/feedback", headers={"Authorization": f"Bearer {client_key}"}, timeout=30,
                           json={"answer_id": done.id, "value": "up" if i % 2 else "down", "user": f"u{i}"})
            assert r.status_code == 200, r.text
            answers.append(done.id)
        spread = [_metric(u, "vllm:request_success_total") - b for u, b in zip(urls, served_before, strict=True)]
        assert all(n >= 2 for n in spread), f"the router did not spread the chats over both replicas: {spread}"

        ran = [_cli("align", "--now", data=d) for _, d in apps]   # the leader runs it; the other one refuses
        done_runs = [r for r in ran if r.returncode == 0]
        assert len(done_runs) == 1, [(r.returncode, r.stdout[-500:], r.stderr[-500:]) for r in ran]
        leader = ran.index(done_runs[0])
        other = 1 - leader
        assert "lease" in (ran[other].stdout + ran[other].stderr)

        def served(url: str) -> str:
            return httpx.get(f"{url}/api/health", timeout=5).json()["served"]

        version = served(apps[leader][0])
        assert version.startswith("kto-v"), done_runs[0].stdout[-1000:]
        for u in urls:                                       # the promotion reached both replicas …
            models = httpx.get(f"{u}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()
            assert version in [m["id"] for m in models["data"]]
        wait_until(lambda: served(apps[other][0]) == version, 30, "the other app to follow the promotion")
        with FeedbackStore(pg_url) as store:                 # … and both apps answer with it
            for url, _ in apps:
                oa = openai.OpenAI(base_url=url + "/v1", api_key=client_key, max_retries=0, timeout=60)
                done = oa.chat.completions.create(model="kto-loop", user="after",
                                                  messages=[{"role": "user", "content": "And now?"}])
                assert store.get_answer(done.id)["adapter"] == version

        back = _cli("rollback", data=apps[other][1])        # a rollback through the other app reaches the leader
        assert back.returncode == 0, back.stdout + back.stderr
        wait_until(lambda: served(apps[leader][0]) == "base", 30, "the leader to follow the rollback")
        assert served(apps[other][0]) == "base"
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p is not procs[0] else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for r in replicas:
            r.stop()
