"""Stand-ins for the vLLM server and the adapter registry, for app tests that need neither."""

from __future__ import annotations

from pathlib import Path


class OfflineServer:
    """A vLLM server that is never healthy: pages and APIs that only read the store still work."""

    base_url = "http://127.0.0.1:9"

    def is_healthy(self, timeout: float = 2.0) -> bool:
        return False


class BaseRegistry:
    """Serves the base model and has nothing to roll back to."""

    def current(self) -> str:
        return "base"

    def rollback(self, version: str | None = None) -> str:
        raise ValueError("no previous version to roll back to")


class PointerRegistry:
    """Promotes by remembering version → adapter directory, like the real registry's pointer, without vLLM."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}
        self.pointer = "base"

    def current(self) -> str:
        return self.pointer

    def promote(self, adapter_dir: Path, check=None) -> str:
        from serving.registry import AdapterRejected

        version = f"kto-v{len(self.paths) + 1}"
        self.paths[version] = Path(adapter_dir)
        if check is not None:
            ok, why = check(version, self.pointer)
            if not ok:
                raise AdapterRejected(why)
        self.pointer = version
        return version

    def path_of(self, version: str) -> Path | None:
        return self.paths.get(version)
