"""Share caps for a training snapshot: no one identity or network address may supply more than a set fraction of
what a run trains on, because a few raters (or one script minting identities) could otherwise steer the model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


def check_share(name: str, share: float | None) -> None:
    """A share is a fraction in (0, 1] or None (no cap)."""
    if share is None:
        return
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1] or None, got {share!r}")


def share_cap(counts: Sequence[int], share: float, singles: int = 0) -> int | None:
    """The largest per-group count c with c <= share * sum(min(n, c)): keeping at most c rows of every group leaves
    no group above `share` of what is kept. `singles` rows belong to no group (unknown address) and are never
    dropped. None when nothing needs capping, or when the groups are too few for the share to be met at all
    (fewer than 1/share of them): then only dropping nearly everything would meet it, and no cap applies."""
    counts = [n for n in counts if n > 0]
    if not counts:
        return None
    k = len(counts) + singles
    if k * share < 1 - 1e-9:
        return None

    def fits(c: int) -> bool:
        return c <= share * (sum(min(n, c) for n in counts) + singles) + 1e-9

    lo, hi = 1, max(counts)          # fits(1) holds (k * share >= 1); share*f(c) - c is concave in c
    if fits(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass
class CapReport:
    """What the caps did to one snapshot: the per-group limits found and the rows each group lost."""
    max_user_share: float | None
    max_addr_share: float | None
    n_candidates: int = 0
    n_kept: int = 0
    user_cap: int | None = None       # rows kept per identity at most (None: no identity was capped)
    addr_cap: int | None = None
    inactive: list[str] = field(default_factory=list)   # a cap that could not apply, and why
    dropped_by_user: dict[str, int] = field(default_factory=dict)
    dropped_by_addr: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"max_user_share": self.max_user_share, "max_addr_share": self.max_addr_share,
                "n_candidates": self.n_candidates, "n_kept": self.n_kept, "n_dropped": self.n_candidates - self.n_kept,
                "user_cap": self.user_cap, "addr_cap": self.addr_cap, "inactive": list(self.inactive),
                "dropped_by_user": dict(self.dropped_by_user), "dropped_by_addr": dict(self.dropped_by_addr)}


def cap_shares(users: Sequence[str], addrs: Sequence[str | None], max_user_share: float | None,
               max_addr_share: float | None) -> tuple[list[bool], CapReport]:
    """Which rows (newest first) a snapshot keeps under both caps, and the report. An over-cap group keeps its
    most recent rows: deterministic, and what it says now is what the served model should learn. Dropping for one
    cap shrinks the total the other is measured against, so the two are applied in turn until neither drops."""
    check_share("max_user_share", max_user_share)
    check_share("max_addr_share", max_addr_share)
    if len(users) != len(addrs):
        raise ValueError("users and addrs must have one entry per row")
    keep = [True] * len(users)
    report = CapReport(max_user_share, max_addr_share, n_candidates=len(users))
    dims = [(name, keys, share, dropped) for name, keys, share, dropped in (
        ("user", users, max_user_share, report.dropped_by_user),
        ("addr", addrs, max_addr_share, report.dropped_by_addr)) if share is not None]
    inactive: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name, keys, share, dropped in dims:
            counts = Counter(k for k, kept in zip(keys, keep, strict=True) if kept and k is not None)
            singles = sum(1 for k, kept in zip(keys, keep, strict=True) if kept and k is None)
            cap = share_cap(list(counts.values()), share, singles)
            if cap is None:
                if counts and (len(counts) + singles) * share < 1 - 1e-9:
                    inactive[name] = (f"{name} cap {share:g} not applied: only {len(counts) + singles} "
                                      f"{'identities' if name == 'user' else 'addresses'}, it needs at least "
                                      f"{_needed(share)}")
                continue
            inactive.pop(name, None)
            setattr(report, f"{name}_cap", cap)
            seen: Counter[str] = Counter()
            for i, k in enumerate(keys):
                if keep[i] and k is not None:
                    seen[k] += 1
                    if seen[k] > cap:
                        keep[i] = False
                        dropped[k] = dropped.get(k, 0) + 1
                        changed = True
    report.inactive = list(inactive.values())
    report.n_kept = sum(keep)
    return keep, report


def _needed(share: float) -> int:
    """The fewest groups for which a share cap can hold: ceil(1 / share), robust to float error."""
    n = int(1 / share)
    return n if n * share >= 1 - 1e-9 else n + 1


def top_shares(keys: Sequence[str | None], keep: Sequence[bool], dropped: dict[str, int], top: int) -> list[dict]:
    """The `top` groups with the largest share of the kept rows (ties by name), with what the cap took from each."""
    kept = Counter(k for k, ok in zip(keys, keep, strict=True) if ok and k is not None)
    total = sum(keep)
    names = sorted(set(kept) | set(dropped), key=lambda k: (-kept.get(k, 0), -dropped.get(k, 0), k))[:top]
    return [{"key": k, "kept": kept.get(k, 0), "share": kept.get(k, 0) / total if total else 0.0,
             "dropped": dropped.get(k, 0)} for k in names]
