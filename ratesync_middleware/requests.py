"""Transitional: the names this module had, now in the core modules that own them.

To be removed once nothing imports it (marks.py, client_ip.py, facts.py, identities.py,
plans.py, lifecycle.py).
"""

from __future__ import annotations

from .client_ip import ClientAddress
from .facts import RequestFacts
from .identities import Identity, KeyFunction
from .lifecycle import Admission, RequestLimiter
from .marks import Marks, exempt, get_marks, limit
from .plans import NOT_LIMITED, PLAN_CACHE_SIZE, BoundedCache, Limit, Plan

__all__ = [
    "NOT_LIMITED",
    "PLAN_CACHE_SIZE",
    "Admission",
    "BoundedCache",
    "ClientAddress",
    "Identity",
    "KeyFunction",
    "Limit",
    "Marks",
    "Plan",
    "RequestFacts",
    "RequestLimiter",
    "exempt",
    "get_marks",
    "limit",
]
