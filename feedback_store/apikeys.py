"""API keys of client applications (the app's OpenAI-compatible endpoint), kept only as SHA-256 hashes.

A copy of the database then gives nobody a working key; a key is 256 random bits, so an unsalted fast hash is
enough (slow hashes are for passwords people choose). A client's name is part of its rater ids
(`key:<name>/<end user>`), so it is short and plain.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from feedback_store.core import StoreCore, _new_id
from feedback_store.errors import InvalidInput

KEY_PREFIX = "ktol-"
CLIENT_PREFIX = "key:"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_client_name(name: object) -> str:
    """The name as stored, or InvalidInput saying what a name may be."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInput(f"a client name is 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                           f"digit), got {name!r}")
    return name


class ApiKeys(StoreCore):
    """Create, list, check and revoke client API keys; each belongs to this store's deployment."""

    def create_api_key(self, name: str) -> tuple[str, dict]:
        """A new key for client `name` (one active key per name): (the key, shown this once; its listing row)."""
        check_client_name(name)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._tx(f"api-key:{name}") as c:
            active = c.execute("SELECT count(*) FROM api_keys WHERE deployment = ? AND name = ? AND "
                               "revoked_at IS NULL", [self.deployment, name]).fetchone()[0]
            if active:
                raise InvalidInput(f"client {name!r} already has an active key; revoke it first")
            c.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                      [_new_id(), self.deployment, name, key_hash(secret), secret[:len(KEY_PREFIX) + 4],
                       self._now()])
        return secret, self.api_keys(name)[-1]

    def api_keys(self, name: str | None = None) -> list[dict]:
        """Every key ever made (revoked ones too), oldest first: name, prefix, created_at, revoked_at, active."""
        sql = "SELECT name, prefix, created_at, revoked_at FROM api_keys WHERE deployment = ?"
        params: list = [self.deployment]
        if name is not None:
            sql += " AND name = ?"
            params.append(name)
        rows = self._read_dicts(sql + " ORDER BY created_at", params)
        for r in rows:
            r["active"] = r["revoked_at"] is None
        return rows

    def revoke_api_key(self, name: str) -> int:
        """Revoke the active key of client `name`; returns how many were revoked (0: none was active)."""
        check_client_name(name)
        with self._tx() as c:
            n = c.execute("SELECT count(*) FROM api_keys WHERE deployment = ? AND name = ? AND revoked_at IS NULL",
                          [self.deployment, name]).fetchone()[0]
            c.execute("UPDATE api_keys SET revoked_at = ? WHERE deployment = ? AND name = ? AND revoked_at IS NULL",
                      [self._now(), self.deployment, name])
        return int(n)

    def client_of_key(self, secret: str | None) -> str | None:
        """The client name an active key belongs to; None for a missing, unknown or revoked key."""
        if not isinstance(secret, str) or not secret.startswith(KEY_PREFIX) or len(secret) > 128:
            return None
        rows = self._read("SELECT name FROM api_keys WHERE key_sha256 = ? AND deployment = ? AND revoked_at IS NULL",
                          [key_hash(secret), self.deployment])
        return rows[0][0] if rows else None

    def answer_owner(self, answer_id: str) -> str | None:
        """The user id of the conversation an answer of this deployment belongs to (None: no such answer)."""
        rows = self._read("""SELECT c.user_id FROM answers a JOIN conversations c ON c.id = a.conversation_id
            WHERE a.id = ? AND a.deployment = ?""", [answer_id, self.deployment])
        return rows[0][0] if rows else None

    def answer_counts(self) -> dict[str, int]:
        """Answers stored so far by where the chat came from: the chat page, or a client through the API."""
        api, total = self._read(f"""SELECT count(*) FILTER (WHERE starts_with(c.user_id, '{CLIENT_PREFIX}')),
            count(*) FROM answers a JOIN conversations c ON c.id = a.conversation_id WHERE a.deployment = ?""",
                                [self.deployment])[0]
        return {"page": int(total - api), "api": int(api)}
