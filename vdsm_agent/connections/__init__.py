"""Storage connections: the manager (IDs, refcounts, persistence), the
per-target monitor (probes, states, reconnect with backoff) and one backend
per URI scheme. See docs/connections.md."""
