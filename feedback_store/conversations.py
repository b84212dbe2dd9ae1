"""Conversations as trees: user messages and assistant answers (regenerations are siblings), each answer with the
exact prompt context sent to the model, so a rating can later be trained on what the model really saw."""

from __future__ import annotations

import json

import duckdb

from feedback_store.core import BASE, _check_str, _new_id
from feedback_store.errors import InvalidInput, UnknownAnswer, UnknownConversation, WrongDeployment
from feedback_store.ratings import Ratings

ROLES = ("system", "user", "assistant")


class Conversations(Ratings):
    """Writes and reads of conversations, user messages and answers (a new answer seeds the rating caches)."""

    def new_conversation(self, user_id: str, system_prompt: str | None = None) -> str:
        _check_str("user_id", user_id)
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise InvalidInput("system_prompt must be a string or None")
        conv_id = _new_id()
        with self._tx() as c:
            now = self._now()
            c.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                      [conv_id, self.deployment, user_id, system_prompt, now])
            if system_prompt:
                c.execute("INSERT INTO messages VALUES (?, ?, NULL, 'system', ?, ?)",
                          [_new_id(), conv_id, system_prompt, now])
        return conv_id

    def _check_conversation(self, c: duckdb.DuckDBPyConnection, conv_id: str) -> None:
        _check_str("conversation id", conv_id, error=UnknownConversation)
        row = c.execute("SELECT deployment FROM conversations WHERE id = ?", [conv_id]).fetchone()
        if row is None:
            raise UnknownConversation(f"unknown conversation {conv_id!r}")
        if row[0] != self.deployment:
            raise WrongDeployment(f"conversation {conv_id!r} belongs to deployment {row[0]!r}, "
                                  f"not {self.deployment!r}")

    def _last_node(self, c: duckdb.DuckDBPyConnection, conv_id: str) -> str | None:
        row = c.execute("""SELECT id FROM (
                SELECT id, created_at FROM messages WHERE conversation_id = ? AND role <> 'system'
                UNION ALL SELECT id, created_at FROM answers WHERE conversation_id = ?) AS turns
            ORDER BY created_at DESC LIMIT 1""", [conv_id, conv_id]).fetchone()
        return row[0] if row else None

    def add_user_message(self, conv_id: str, content: str, parent_id: str | None = None) -> str:
        """parent_id: the answer this message replies to; None = the latest turn of the conversation."""
        if not isinstance(content, str) or not content.strip():
            raise InvalidInput("message content must be a non-empty string")
        msg_id = _new_id()
        with self._tx() as c:
            self._check_conversation(c, conv_id)
            if parent_id is None:
                parent_id = self._last_node(c, conv_id)
            else:
                found = c.execute("SELECT count(*) FROM answers WHERE id = ? AND conversation_id = ?",
                                  [parent_id, conv_id]).fetchone()[0]
                if not found:
                    raise UnknownConversation(f"parent {parent_id!r} is not an answer of conversation {conv_id!r}")
            c.execute("INSERT INTO messages VALUES (?, ?, ?, 'user', ?, ?)",
                      [msg_id, conv_id, parent_id, content, self._now()])
        return msg_id

    def add_answer(self, conv_id: str, parent_id: str, prompt_messages: list[dict], text: str,
                   adapter: str = BASE, sampling: dict | None = None, prompt_tokens: int | None = None,
                   completion_tokens: int | None = None, latency_ms: float | None = None) -> str:
        """Store one assistant answer to the user message `parent_id`; a regeneration is another call with the
        same parent (siblings are kept). prompt_messages is the exact context sent to the model."""
        if not isinstance(prompt_messages, list) or not prompt_messages:
            raise InvalidInput("prompt_messages must be a non-empty list of {role, content} dicts")
        clean = []
        for m in prompt_messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidInput(f"bad prompt message {m!r}: need role in {ROLES} and string content")
            clean.append({"role": m["role"], "content": m["content"]})
        if not isinstance(text, str):
            raise InvalidInput("answer text must be a string")
        _check_str("adapter", adapter)
        for name, v in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise InvalidInput(f"{name} must be a non-negative int or None")
        if latency_ms is not None and not isinstance(latency_ms, int | float):
            raise InvalidInput("latency_ms must be a number or None")
        ans_id = _new_id()
        with self._tx() as c:
            self._check_conversation(c, conv_id)
            row = c.execute("SELECT role FROM messages WHERE id = ? AND conversation_id = ?",
                            [parent_id, conv_id]).fetchone()
            if row is None or row[0] != "user":
                raise UnknownConversation(f"parent {parent_id!r} is not a user message of conversation {conv_id!r}")
            c.execute("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      [ans_id, self.deployment, conv_id, parent_id, json.dumps(clean, ensure_ascii=False), text,
                       adapter, json.dumps(sampling or {}), prompt_tokens, completion_tokens,
                       None if latency_ms is None else float(latency_ms), self._now()])
        with self._lock:     # after the COMMIT: the caches describe committed rows only
            self._remember_answer(ans_id, self.deployment, adapter)
            self._remember_ratings(ans_id, {})       # a new answer has no ratings yet
        return ans_id

    def get_answer(self, answer_id: str) -> dict:
        rows = self._read_dicts("SELECT * FROM answers WHERE id = ?", [answer_id])
        if not rows:
            raise UnknownAnswer(f"unknown answer {answer_id!r}")
        a = rows[0]
        if a["deployment"] != self.deployment:
            raise WrongDeployment(f"answer {answer_id!r} belongs to deployment {a['deployment']!r}")
        a["prompt_messages"] = json.loads(a["prompt_messages"])
        a["sampling"] = json.loads(a["sampling"]) if a["sampling"] else {}
        return a

    def siblings(self, answer_id: str) -> list[dict]:
        """Every answer to the same user message (regenerations included), oldest first."""
        a = self.get_answer(answer_id)
        return [{**r, "prompt_messages": json.loads(r["prompt_messages"])} for r in self._read_dicts(
            "SELECT * FROM answers WHERE parent_id = ? ORDER BY created_at", [a["parent_id"]])]

    def conversation(self, conv_id: str) -> list[dict]:
        """All turns (system, user, every answer) of a conversation in creation order."""
        self._check_conversation(self._cursor(), conv_id)
        return self._read_dicts("""SELECT id, parent_id, role, content, NULL AS adapter, created_at FROM messages
                WHERE conversation_id = ?
            UNION ALL SELECT id, parent_id, 'assistant', text, adapter, created_at FROM answers
                WHERE conversation_id = ? ORDER BY created_at""", [conv_id, conv_id])

    def user_conversations(self, user_id: str, limit: int = 50) -> list[dict]:
        """The conversations `user_id` owns that have an answer, the most recently answered first, at most `limit`:
        id, created_at, updated_at (its latest answer) and first_message (its first user message, cut to 200
        characters: enough for a title, bounded however long the message was)."""
        _check_str("user_id", user_id)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InvalidInput("limit must be a positive int")
        rows = self._read_dicts("""SELECT c.id, c.created_at, max(a.created_at) AS updated_at
                FROM conversations c JOIN answers a ON a.conversation_id = c.id
                WHERE c.user_id = ? AND c.deployment = ?
                GROUP BY c.id, c.created_at ORDER BY updated_at DESC LIMIT ?""",
                                [user_id, self.deployment, min(limit, 1000)])
        if not rows:
            return rows
        marks = ", ".join("?" for _ in rows)
        first: dict[str, str] = {}
        for conv_id, text in self._read(f"""SELECT conversation_id, substr(content, 1, 200) FROM messages
                WHERE role = 'user' AND conversation_id IN ({marks}) ORDER BY created_at""", [r["id"] for r in rows]):
            first.setdefault(conv_id, text)
        return [{**r, "first_message": first.get(r["id"], "")} for r in rows]

    def user_conversation(self, user_id: str, conv_id: str) -> list[dict]:
        """Every user message and answer of a conversation `user_id` owns, oldest first (id, parent_id, role,
        content, adapter, created_at, and `rating`: this user's current value on each answer). Someone else's
        conversation is refused exactly like an unknown id, so ids of others are neither shown nor confirmed."""
        _check_str("user_id", user_id)
        _check_str("conversation id", conv_id, error=UnknownConversation)
        owner = self._read("SELECT user_id FROM conversations WHERE id = ? AND deployment = ?",
                           [conv_id, self.deployment])
        if not owner or owner[0][0] != user_id:
            raise UnknownConversation(f"unknown conversation {conv_id!r}")
        return self._read_dicts("""SELECT id, parent_id, role, content, NULL AS adapter, NULL AS rating, created_at
                FROM messages WHERE conversation_id = ? AND role = 'user'
            UNION ALL SELECT a.id, a.parent_id, 'assistant', a.text, a.adapter, r.value, a.created_at
                FROM answers a LEFT JOIN ratings r ON r.answer_id = a.id AND r.user_id = ?
                WHERE a.conversation_id = ? ORDER BY created_at""", [conv_id, user_id, conv_id])
