"""Several app processes ("replicas") on one PostgreSQL store: only the lease holder's schedule fires and only it
starts runs; every replica serves the version the store names within a sync interval, loaded into its own vLLM.

Each replica here is what `kto-loop run` builds, minus the parts these rules do not touch: its own store connection,
registry, stand-in vLLM (tests/app/test_served_truth.py) and data dir, and the real RealignScheduler with the real
lease, around a stand-in realigner that records runs in the store without training."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from app.loop import served
from app.loop.realign import RunInProgress
from app.loop.scheduler import JOB_ID, NotLeader, RealignScheduler
from app.operator_settings import OperatorSettings, SettingsStore
from feedback_store import FeedbackStore
from feedback_store.lease import LeaderLease
from serving.registry import AdapterRegistry
from tests.app.test_served_truth import FakeVLLM, make_adapter

SYNC_S = 0.2


class FakeRealigner:
    """Records each run in the store (open while it lasts, as the real one) and in `runs`; trains nothing."""

    def __init__(self, store: FeedbackStore, runs: list[tuple[str, str]], name: str):
        self.store, self.runs, self.name = store, runs, name
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._lock.locked()

    def run(self, trigger, progress=None, *, max_examples=None, since=None):
        with self._lock:
            run = self.store.start_run(trigger)
            self.runs.append((self.name, trigger))
            if progress is not None:
                progress({"event": "phase", "phase": "snapshot"})
            self.store.finish_run(run, "rejected")


class Replica:
    def __init__(self, name: str, url: str, root: Path, runs: list):
        self.name = name
        self.store = FeedbackStore(url)
        self.vllm = FakeVLLM()
        self.registry = AdapterRegistry(self.vllm, root / name / "adapters", max_lora_rank=16)
        settings = SettingsStore(root / name, OperatorSettings(interval_minutes=60, min_new_ratings=0))
        self.realigner = FakeRealigner(self.store, runs, name)
        self.scheduler = RealignScheduler(self.realigner, self.store, settings, lease=LeaderLease(self.store),
                                          follow=lambda: served.follow(self.store, self.registry), sync_s=SYNC_S)

    def close(self) -> None:
        self.scheduler.shutdown()
        self.vllm.close()
        self.store.close()


@pytest.fixture
def replicas(pg_url, tmp_path):
    runs: list[tuple[str, str]] = []
    made: list[Replica] = []

    def make(name: str) -> Replica:
        made.append(Replica(name, pg_url, tmp_path, runs))
        return made[-1]
    make.runs = runs
    yield make
    for r in made:
        r.close()


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _fire_now(r: Replica) -> None:
    r.scheduler.scheduler.modify_job(JOB_ID, next_run_time=datetime.now(r.scheduler.scheduler.timezone))


# ---------------------------------------------------------------- one loop

def test_only_the_lease_holder_schedules_and_the_other_takes_over_when_it_stops(replicas):
    a, b = replicas("a"), replicas("b")
    a.scheduler.start()
    b.scheduler.start()
    assert a.scheduler.leader and not b.scheduler.leader
    assert a.scheduler.next_run_time() is not None and b.scheduler.next_run_time() is None
    _fire_now(a)
    _wait(lambda: replicas.runs == [("a", "schedule")] and not a.realigner.running, 10, "a's scheduled run")

    with pytest.raises(NotLeader, match="does not run the realignment loop: kto-loop leader .* holds the store's "
                                        "leader lease; start the run there"):
        b.scheduler.start_run("operator")
    assert b.scheduler.tick()["started"] is False and replicas.runs == [("a", "schedule")]

    a.scheduler.shutdown()    # the leader stops: b's next sync takes the role and starts its schedule
    _wait(lambda: b.scheduler.leader and b.scheduler.next_run_time() is not None, 10 * SYNC_S + 2, "b to lead")
    _fire_now(b)
    _wait(lambda: len(replicas.runs) == 2 and not b.realigner.running, 10, "b's scheduled run")
    b.scheduler.start_run("operator")
    b.scheduler.wait(10)
    assert replicas.runs == [("a", "schedule"), ("b", "schedule"), ("b", "operator")]


def test_the_leader_starts_no_run_while_another_live_process_has_one_open(replicas):
    """A former leader still running its run (it lost the lease, not its life): the new leader waits for it."""
    a, b = replicas("a"), replicas("b")
    b.scheduler.start()
    run = a.store.start_run("schedule")   # a's store connection holds the run, as a live process's does
    with pytest.raises(RunInProgress, match=f"run {run} is in progress in another app process"):
        b.scheduler.start_run("operator")
    assert b.scheduler.tick()["why"] == f"run {run} is in progress in another app process"
    a.store.finish_run(run, "rejected")
    b.scheduler.start_run("operator")
    b.scheduler.wait(10)
    assert replicas.runs == [("b", "operator")]


# ---------------------------------------------------------------- one served version

def test_a_promotion_and_a_rollback_on_one_replica_reach_the_other(replicas, tmp_path):
    a, b = replicas("a"), replicas("b")
    b.scheduler.start()                   # its sync job follows the store every SYNC_S
    v1 = served.promote(a.store, a.registry, make_adapter(tmp_path / "cand1", 1.0), parent=None, run_id=None)
    _wait(lambda: b.registry.current() == v1, 10 * SYNC_S + 2, "b to serve kto-v1")
    assert v1 == "kto-v1" and v1 in b.vllm.loaded
    copy = Path(b.registry.path_of(v1))   # b's own copy, checked against the store's sha256
    assert copy.parent == tmp_path / "b" / "adapters"
    assert served.sha256_of(copy) == next(x["sha256"] for x in b.store.adapters() if x["version"] == v1)

    served.rollback(a.store, a.registry, "base", reason="operator")
    _wait(lambda: b.registry.current() == "base", 10 * SYNC_S + 2, "b to serve base again")
    assert a.store.current_adapter() == "base"


def test_an_operator_rolls_back_on_any_replica_to_a_version_another_one_promoted(replicas, tmp_path):
    a, b = replicas("a"), replicas("b")
    for i in (1, 2):
        served.promote(a.store, a.registry, make_adapter(tmp_path / f"cand{i}", float(i)), parent=None, run_id=None)
    assert b.registry.current() == "base"   # b never served either (its follower was off)
    assert served.rollback(b.store, b.registry, "kto-v1", reason="operator") == ("base", "kto-v1")
    assert "kto-v1" in b.vllm.loaded and b.store.current_adapter() == "kto-v1"
    assert served.follow(a.store, a.registry) == ["serving kto-v1 (the registry had kto-v2)"]


def test_following_never_undoes_this_replicas_own_switch_in_progress(replicas, tmp_path):
    """Between the registry's switch and the store's record the two disagree; the follower must wait it out."""
    a = replicas("a")
    seen: list = []
    mark = a.store.mark_promoted

    def follow_then_mark(*args, **kw):
        t = threading.Thread(target=lambda: seen.append(served.follow(a.store, a.registry)))
        t.start()
        t.join(10)
        return mark(*args, **kw)
    a.store.mark_promoted = follow_then_mark
    v1 = served.promote(a.store, a.registry, make_adapter(tmp_path / "cand1", 1.0), parent=None, run_id=None)
    assert seen == [[]] and a.registry.current() == a.store.current_adapter() == v1


def test_a_replica_starting_or_following_leaves_another_replicas_promotion_alone(replicas, tmp_path):
    a, b = replicas("a"), replicas("b")
    a.store.register_adapter("kto-v1", make_adapter(tmp_path / "cand1"))
    a.store.begin_promotion("kto-v1")      # a is between "promoting" and the switch
    assert served.reconcile(b.store, b.registry, shared=True) == []
    assert served.follow(b.store, b.registry) == [] and b.store.pending_promotions() == ["kto-v1"]


def test_a_version_a_replica_cannot_load_is_never_recorded_as_a_rollback_for_all(replicas, tmp_path):
    """b cannot serve kto-v2 (its files differ from what the store recorded): b keeps serving what it can and says
    so, and the store, which every replica follows, still names kto-v2."""
    a, b = replicas("a"), replicas("b")
    v1 = served.promote(a.store, a.registry, make_adapter(tmp_path / "cand1", 1.0), parent=None, run_id=None)
    assert served.follow(b.store, b.registry) == [f"serving {v1} (the registry had base)"]
    v2 = served.promote(a.store, a.registry, make_adapter(tmp_path / "cand2", 2.0), parent=v1, run_id=None)
    make_adapter(Path(a.registry.path_of(v2)), 9.0)   # its files changed after it was recorded
    notes = served.follow(b.store, b.registry)
    assert notes == [f"serving {v1} here, not {v2} as the store says: {v2}: the weights of {v2} in "
                     f"{a.registry.path_of(v2)} are not the ones recorded for it "
                     f"(sha256 {served.sha256_of(Path(a.registry.path_of(v2)))[:12]}…, recorded "
                     f"{next(x['sha256'] for x in a.store.adapters() if x['version'] == v2)[:12]}…)"], notes
    assert b.registry.current() == v1 and v2 not in b.vllm.loaded
    assert b.store.current_adapter() == v2 and b.store.adapter_events()[-1]["event"] == "promoted"


def test_a_new_leader_names_its_versions_after_the_ones_the_store_knows(replicas, tmp_path):
    """b never served a's versions (it was down, say); its first promotion must not take one of their names."""
    a, b = replicas("a"), replicas("b")
    for i in (1, 2):
        served.promote(a.store, a.registry, make_adapter(tmp_path / f"cand{i}", float(i)), parent=None, run_id=None)
    v3 = served.promote(b.store, b.registry, make_adapter(tmp_path / "cand3", 3.0), parent=None, run_id=None)
    assert v3 == "kto-v3" and b.store.current_adapter() == v3


# ---------------------------------------------------------------- the app's wiring (build_stack, create_app's part)

def test_the_app_wires_the_lease_and_the_follower_on_postgresql_only(pg_url, tmp_path, monkeypatch):
    """Two `kto-loop run` stacks on one PostgreSQL store: a replica starting after a promotion serves it at once
    (start-up reconcile, shared), the scheduler the app builds leads or follows; on the DuckDB file none of it."""
    import serving.server
    from app.config import Config
    from app.main import build_stack, replica_loop

    fakes = iter([FakeVLLM(), FakeVLLM(), FakeVLLM()])
    monkeypatch.setattr(serving.server, "VLLMServer", lambda spec: next(fakes))

    def cfg(name: str, **kw) -> Config:
        return Config(data_dir=tmp_path / name, model_dir=tmp_path / "model", promote_max_capability_drop=-1.0,
                      replica_sync_s=SYNC_S, **kw).resolved()
    with build_stack(cfg("a", db_url=pg_url)) as a:
        v1 = served.promote(a.store, a.registry, make_adapter(tmp_path / "cand1", 1.0), parent=None, run_id=None)
        with build_stack(cfg("b", db_url=pg_url)) as b:
            assert b.registry.current() == v1 and v1 in b.server.loaded
            sa = RealignScheduler(a.realigner, a.store, a.settings, **replica_loop(a))
            sb = RealignScheduler(b.realigner, b.store, b.settings, **replica_loop(b))
            try:
                sa.start()
                sb.start()
                assert sa.leader and not sb.leader
                served.rollback(a.store, a.registry, "base", reason="operator")
                _wait(lambda: b.registry.current() == "base", 10 * SYNC_S + 2, "b to follow the rollback")
            finally:
                sa.shutdown()
                sb.shutdown()
        for fake in (a.server, b.server):
            fake.close()
    with build_stack(cfg("solo")) as solo:
        assert replica_loop(solo) == {}
        solo.server.close()


def test_align_now_on_a_follower_names_the_leader_before_judging_its_data(tmp_path):
    """A follower with nothing new to train on still answers "run it on the leader", not "too few ratings"."""
    from types import SimpleNamespace

    from app.web.console import Operator

    leader_says = "another app process (pid 7 on host-a) holds the store's leader lease; start the run there"
    scheduler = SimpleNamespace(not_leader_reason=lambda: leader_says,
                                start_run=lambda *a, **k: pytest.fail("started"))
    realigner = SimpleNamespace(running=False, extra_args=[],
                                next_run=lambda *a: pytest.fail("judged the data of a process that does not lead"))
    op = Operator(None, None, realigner, scheduler, SettingsStore(tmp_path, OperatorSettings()))
    with pytest.raises(NotLeader, match="leader lease"):
        op.realign_now()


def test_only_the_leader_checks_the_vllm_replicas(tmp_path):
    """A follower may still name the version before a promotion: it must not put a replica back without it."""
    from types import SimpleNamespace

    calls = []
    sched = RealignScheduler(SimpleNamespace(running=False), None, SettingsStore(tmp_path, OperatorSettings()),
                             lease=SimpleNamespace(), serving_sync=lambda: calls.append(1) or {"r": "in service"})
    sched.leader = False
    assert sched.check_serving() is None and calls == []
    sched.leader = True
    assert sched.check_serving() == {"r": "in service"} and calls == [1]


def test_the_app_checks_vllm_replicas_only_behind_a_router():
    from types import SimpleNamespace

    from app.config import Config
    from app.main import replica_loop

    registry = SimpleNamespace(sync_replicas=lambda: {})
    routed = Config(vllm_router_url="http://r:30000", vllm_replica_urls="http://a:8000", replica_sync_s=2.0)
    assert replica_loop(SimpleNamespace(cfg=routed, registry=registry)) == {
        "serving_sync": registry.sync_replicas, "sync_s": 2.0}
    assert replica_loop(SimpleNamespace(cfg=Config(), registry=registry)) == {}
