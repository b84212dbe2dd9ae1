"""Who rates in a simulation: real raters are noisy, rate some answers only, differ from one another, change their
mind, and some attack; each of these is a pure wrapper or a deterministic draw, so a seed replays a run exactly."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.sim.inputs import Rater, SimulationError

ATTACKER_ADDR = "203.0.113.66"  # one client address (TEST-NET-3) for every identity the attacker mints


def draw(seed: object, *key: object) -> float:
    """A uniform number in [0, 1) fixed by its inputs: the same chat gets the same draw whatever order the
    concurrent chats finish in, so a seeded run is repeatable."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def flipped(rater: Rater, p: float, seed: object) -> Rater:
    """`rater` with each thumb turned over with probability `p` (label noise); skipped answers stay skipped."""
    def rate(prompt: str, answer: str) -> bool | None:
        verdict = rater(prompt, answer)
        if verdict is None or draw(seed, "flip", prompt, answer) >= p:
            return verdict
        return not verdict

    return rate


def sometimes(rater: Rater, p: float, seed: object) -> Rater:
    """`rater` who rates an answer with probability `p` only, as most real users leave most answers unrated."""
    def rate(prompt: str, answer: str) -> bool | None:
        return rater(prompt, answer) if draw(seed, "rate", prompt, answer) < p else None

    return rate


def opposite(rater: Rater) -> Rater:
    """The reverse preference: up where `rater` says down, which is what an attacker pushing the model away from
    the honest users wants."""
    def rate(prompt: str, answer: str) -> bool | None:
        verdict = rater(prompt, answer)
        return None if verdict is None else not verdict

    return rate


@dataclass(frozen=True)
class Group:
    """One kind of simulated user and its share of the chats."""

    name: str
    rater: Rater = field(repr=False)
    share: float
    identities: int = 0  # 0: every chat a new identity from its own address (many real users); N: N reused ids
    addr: str | None = None  # with identities: the one client address they all come from
    noisy: bool = True  # label noise and rating probability apply (an attacker rates every answer it gets, exactly)


@dataclass(frozen=True)
class User:
    """Who sends chat number i: the identity and address the store records, and how this user rates."""

    group: str
    user_id: str
    addr: str
    rater: Rater = field(repr=False)


@dataclass(frozen=True)
class Population:
    """Groups of users (shares summing to 1) with the noise every honest user has; `user(i)` is pure."""

    groups: tuple[Group, ...]
    flip: float = 0.0
    rate_prob: float = 1.0
    seed: object = 0

    def group_of(self, i: int) -> Group:
        """Chat i's group, drawn by share."""
        u, acc = draw(self.seed, "group", i), 0.0
        for g in self.groups:
            acc += g.share
            if u < acc:
                return g
        return self.groups[-1]

    def user(self, i: int, tag: str) -> User:
        """Chat i's user: an honest chat is a fresh identity from its own address, an attacker's one of its
        identities from its one address; noise is drawn per chat."""
        g = self.group_of(i)
        if g.identities:
            user_id, addr = f"sim-{g.name}-{i % g.identities}", g.addr or ATTACKER_ADDR
        else:
            user_id, addr = f"sim-{tag}-{i}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        rater = g.rater
        if g.noisy and self.flip > 0:
            rater = flipped(rater, self.flip, (self.seed, i))
        if g.noisy and self.rate_prob < 1:
            rater = sometimes(rater, self.rate_prob, (self.seed, i))
        return User(g.name, user_id, addr, rater)


def parse_mix(text: str) -> list[tuple[str, float]]:
    """`concise:0.7,bullets:0.3` → [("concise", 0.7), ("bullets", 0.3)]; a rater may itself hold colons
    (MODULE:FUNCTION), the share is what follows the last one. Shares must be in (0, 1) and sum to 1."""
    out: list[tuple[str, float]] = []
    for part in text.split(","):
        spec, sep, share = part.strip().rpartition(":")
        try:
            value = float(share)
        except ValueError:
            value = math.nan
        if not sep or not spec or not 0 < value < 1:
            raise SimulationError(f"bad --mix part {part.strip()!r}: use RATER:SHARE with a share between 0 and 1")
        out.append((spec, value))
    if len(out) < 2:
        raise SimulationError("--mix needs at least two raters, e.g. concise:0.7,bullets:0.3")
    if abs(sum(s for _, s in out) - 1) > 1e-6:
        raise SimulationError(f"--mix shares must sum to 1, got {sum(s for _, s in out):g}")
    if len({spec for spec, _ in out}) != len(out):
        raise SimulationError("--mix names a rater twice")
    return out


@dataclass(frozen=True)
class Case:
    """The robustness case a run simulates. The defaults are the plain case: one honest rater who rates every answer
    truthfully. Held-out measurement always uses the clean preferences, never the noise."""

    main: tuple[str, Rater]  # the (majority's) preference the run is about
    minorities: tuple[tuple[str, Rater, float], ...] = ()  # other rater kinds and their shares of the users
    flip: float = 0.0
    rate_prob: float = 1.0
    change_at: int = 0  # after this cycle the main preference becomes `after` (0: never)
    after: tuple[str, Rater] | None = None
    attacker_share: float = 0.0  # share of chats that are the attacker's
    attacker_identities: int = 1

    def __post_init__(self) -> None:
        """Bad options fail here, before any server starts."""
        if not 0 <= self.flip < 0.5:
            raise SimulationError(f"--flip must be in [0, 0.5), got {self.flip}: at 0.5 the thumbs carry nothing")
        if not 0 < self.rate_prob <= 1:
            raise SimulationError(f"--rate-prob must be in (0, 1], got {self.rate_prob}")
        if (self.change_at > 0) != (self.after is not None) or self.change_at < 0:
            raise SimulationError("--change-at N (N >= 1) and --rater-after RATER go together")
        if not 0 <= self.attacker_share < 1:
            raise SimulationError(f"--attacker-share must be in [0, 1), got {self.attacker_share}")
        if self.attacker_identities < 1:
            raise SimulationError(f"--attacker-identities must be at least 1, got {self.attacker_identities}")
        names = [self.main[0], *(n for n, _, _ in self.minorities), *([self.after[0]] if self.after else [])]
        if len(set(names)) != len(names):
            raise SimulationError(f"the raters of one run must differ, got {names}")

    @property
    def attacker_name(self) -> str:
        """How the attacker's preference is named in results."""
        return f"attacker (not {self.main[0]})"

    def measured(self) -> dict[str, Rater]:
        """Every preference the held-out measurement reports, the main one first."""
        out = {self.main[0]: self.main[1]}
        out.update({name: rater for name, rater, _ in self.minorities})
        if self.after is not None:
            out[self.after[0]] = self.after[1]
        if self.attacker_share > 0:
            out[self.attacker_name] = opposite(self.main[1])
        return out

    def population(self, cycle: int, seed: object) -> Population:
        """Who rates during collection before realignment `cycle` (1-based)."""
        main = self.after if self.after is not None and cycle > self.change_at else self.main
        honest = 1 - self.attacker_share
        minor = sum(s for _, _, s in self.minorities)
        groups = [Group(main[0], main[1], honest * (1 - minor))]
        groups += [Group(name, rater, honest * s) for name, rater, s in self.minorities]
        if self.attacker_share > 0:
            groups.append(Group("attacker", opposite(self.main[1]), self.attacker_share,  # a fixed agenda
                                identities=self.attacker_identities, addr=ATTACKER_ADDR, noisy=False))
        return Population(tuple(groups), self.flip, self.rate_prob, seed)

    def describe(self) -> dict[str, Any]:
        """The case as the results file records it; the goal check reads its roles from here."""
        return {"main": self.main[0], "minorities": {name: s for name, _, s in self.minorities},
                "flip": self.flip, "rate_prob": self.rate_prob, "change_at": self.change_at,
                "after": self.after[0] if self.after else None, "attacker_share": self.attacker_share,
                "attacker_identities": self.attacker_identities if self.attacker_share > 0 else 0,
                "attacker": self.attacker_name if self.attacker_share > 0 else None}

    @property
    def name(self) -> str:
        """The run's name: its rater, or the mix with shares (used for its data directory)."""
        if not self.minorities:
            return self.main[0]
        major = 1 - sum(s for _, _, s in self.minorities)
        parts = [(self.main[0], major)] + [(n, s) for n, _, s in self.minorities]
        return "+".join(f"{n}{round(100 * s)}" for n, s in parts)


def max_answers(n_ratings: int, case: Case) -> int:
    """Chats a collection may start for `n_ratings` thumbs: three per rating as before, divided by the rating
    probability, so raters who rate a third of answers still deliver the cycle's ratings."""
    return math.ceil(3 * n_ratings / case.rate_prob)


def shares(user_ids: Sequence[str], addrs: Sequence[str | None] | None = None,
           attacker: str = "sim-attacker-") -> dict[str, Any]:
    """Who a training snapshot's rows come from: the attacker's share, and the largest single identity's and client
    address's share, the quantities a per-identity/per-address cap bounds."""
    n = len(user_ids)
    out: dict[str, Any] = {"n": n, "attacker_share": None, "top_identity": None, "top_identity_share": None,
                           "top_address": None, "top_address_share": None}
    if not n:
        return out
    out["attacker_share"] = sum(u.startswith(attacker) for u in user_ids) / n
    out["top_identity"], out["top_identity_share"] = _top(user_ids)
    if addrs is not None:
        out["top_address"], out["top_address_share"] = _top([a for a in addrs if a is not None], n)
    return out


def _top(values: Sequence[str], n: int | None = None) -> tuple[str | None, float | None]:
    """The most frequent value and its share of `n` (default: of the values)."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    if not counts:
        return None, None
    top = max(counts, key=lambda k: (counts[k], k))
    return top, counts[top] / (n or len(values))

