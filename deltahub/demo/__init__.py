"""`deltahub demo` and what only it needs: the flow (one function per step, :mod:`.steps`), its budgets, its
texts, the tiny model of ``--fast``, the real assets PyPI packages ship (:mod:`.assets`) and the loopback
Hub-compatible server (:mod:`.localhub`, also the test suite's Hub).

No core module of deltahub imports this package; it uses deltahub like any user would.
"""

from .flow import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
