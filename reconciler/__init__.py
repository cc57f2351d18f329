"""The reconciler: a work queue of keys, the loop that drains it, one reconciler per kind.

`nanod` builds a `loop.Controller` from the reconcilers and hands its `enqueue` to the API;
the contract every reconciler and planner follows lives in `contract` (ARCHITECTURE.md §3).
"""
