"""Prometheus metrics of the agent and the engine (docs/metrics.md).

Counting and exporting are apart, so that the hot path pays for a count and
nothing else:

* ``counters``: what the code counts while it works, in plain Python ints,
  dicts and lists (no locks: everything counted runs on the event loop, or on
  the one DB thread for the engine's resource locks). The dispatcher, the
  connection monitors, the events feed and the engine's workers each own
  theirs. Importing it imports nothing else.
* ``agent`` and ``engine``: ``prometheus_client`` collectors that read those
  counts, and the state the programs keep anyway (unfinished tasks,
  connections, hosts), only when ``/metrics`` is read.
* ``web``: the ``GET /metrics`` route (text exposition by ``prometheus_client``).
"""
