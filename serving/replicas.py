"""Several vLLM servers behind the vLLM project's router (`vllm-router`, github.com/vllm-project/router): chats go to
the router, which spreads them over its workers; adapter loads go to every replica directly, because the router
forwards a request to one worker and does not know which adapters each one holds (docs/deploy.md).

`ReplicaSet` stands where a `VLLMServer` stands for the registry, the chat client and the app; the replicas and
the router are the operator's processes, started and restarted by them (or their orchestrator), never by us.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from serving.server import auth_header

log = logging.getLogger(__name__)


class RouterError(RuntimeError):
    """The router refused or did not answer a worker-management call."""


@dataclass
class Router:
    """The router's worker-management API (`/list_workers`, `/add_worker`, `/remove_worker`): who gets traffic.

    The router checks a worker's health before `/add_worker` returns, so `add` may take until the worker is up;
    it has no authentication of its own, hence the router's port must be reachable only by the app (deploy.md)."""

    url: str
    add_timeout: float = 120.0

    def workers(self) -> list[str]:
        r = httpx.get(f"{self.url.rstrip('/')}/list_workers", timeout=5.0)
        if r.status_code != 200:
            raise RouterError(f"router {self.url} /list_workers: HTTP {r.status_code} {r.text[:200]}")
        return [u.rstrip("/") for u in r.json().get("urls", [])]

    def add(self, worker: str) -> None:
        self._call("add_worker", worker, self.add_timeout)

    def remove(self, worker: str) -> None:
        self._call("remove_worker", worker, 10.0)

    def _call(self, what: str, worker: str, timeout: float) -> None:
        try:
            r = httpx.post(f"{self.url.rstrip('/')}/{what}", params={"url": worker}, timeout=timeout)
        except httpx.HTTPError as e:
            raise RouterError(f"router {self.url} /{what} {worker}: {e}") from e
        if r.status_code != 200:
            raise RouterError(f"router {self.url} /{what} {worker}: HTTP {r.status_code} {r.text[:200]}")


@dataclass
class ReplicaSet:
    """The serving side of the scaled deployment: `base_url` (the router) for chats, `replicas` for adapter loads.

    Every replica runs the same base model under the same served name and API key (vLLM `--api-key`); the router
    passes the client's Authorization header through."""

    router_url: str
    replicas: Sequence[str]
    api_key: str | None = None
    served_model_name: str = "base"
    health_timeout: float = 2.0
    router: Router = field(init=False)

    def __post_init__(self) -> None:
        self.replicas = tuple(u.rstrip("/") for u in self.replicas)
        if not self.replicas:
            raise ValueError("a replica set needs at least one vLLM replica URL")
        if len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"replica URLs repeat: {list(self.replicas)}")
        self.router = Router(self.router_url)

    @property
    def base_url(self) -> str:
        return self.router_url.rstrip("/")

    def auth_headers(self) -> dict[str, str]:
        return auth_header(self.api_key)

    def replica_healthy(self, url: str) -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=self.health_timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def in_service(self) -> list[str]:
        """The replicas the router sends chats to now."""
        mine = set(self.replicas)
        return [u for u in self.router.workers() if u in mine]

    def is_healthy(self, timeout: float = 3.0) -> bool:
        """Chats can be answered: the router answers and at least one replica in its list is healthy."""
        try:
            return any(self.replica_healthy(u) for u in self.in_service())
        except (RouterError, httpx.HTTPError, ValueError):
            return False

    # The app's VLLMServer interface: the operator's processes are neither started nor stopped here.
    def start(self) -> ReplicaSet:
        return self

    def stop(self) -> None:
        pass
