"""GET /api/admin/runs/{run_id}/examples: the ratings a run trained on, held out or dropped, a page at a time.

A router of its own beside app/web/admin_api.py, on the same prefix, so AuthMiddleware (admin login) and
AdminRequestGuard cover it as they cover the rest of the operator API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from app.web.admin_api import API_PREFIX, _jsonable


def runs_router(op: Any) -> APIRouter:
    """The run-examples route on the console's Operator (`op`, app/web/console.py)."""
    router = APIRouter(prefix=API_PREFIX)

    @router.get("/runs/{run_id}/examples")
    def run_examples(run_id: str, role: str = "trained", limit: int = 200, offset: int = 0):
        """One page of a run's snapshot ratings in one role, with the prompt, answer, thumb, reason and comment,
        the rater shortened; `counts` gives each role's total."""
        from feedback_store import InvalidInput, StoreError, UnknownRun, WrongDeployment

        if not 1 <= limit <= 1000:
            raise HTTPException(400, f"limit must be in [1, 1000], got {limit}")
        try:
            return _jsonable(op.run_examples(run_id, role, limit=limit, offset=offset))
        except (UnknownRun, WrongDeployment) as e:
            raise HTTPException(404, str(e)) from None
        except InvalidInput as e:
            raise HTTPException(400, str(e)) from None
        except StoreError as e:
            raise HTTPException(500, str(e)) from None

    return router
