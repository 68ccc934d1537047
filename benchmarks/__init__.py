"""Benchmarks for vdsm-agent: ``python -m benchmarks`` runs them all.

* ``bench_dispatch``: ``Dispatcher.dispatch`` of a ``ping`` body in-process;
* ``bench_http``: ``ping`` over HTTP against the real agent versus a bare
  aiohttp JSON handler (``bare_server``), driven by wrk.

See docs/benchmarks.md for the method and the latest numbers.
"""

from __future__ import annotations

# The agent must answer ping over HTTP at no less than this share of the bare
# aiohttp handler's throughput, with params validation on.
TARGET_RATIO = 0.85
