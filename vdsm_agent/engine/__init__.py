"""vdsm-engine: the central engine that knows many hosts and their agents.

It keeps a registry of hosts in its own database (sqlite by default,
PostgreSQL when configured), learns every host's tasks and storage
connections (one long-poll events subscription per host plus a periodic full
resynchronisation, every host on its own asyncio task with its own timeouts),
serves aggregated views with partial results, and runs fan-out actions as
jobs with one step per host. See docs/engine.md.

Modules:

* ``settings``: the engine's settings table (same machinery as the agent's);
* ``store``: peewee models on their own proxy, the DB thread, migrations and
  the queries (``store.repository``);
* ``agentclient``: JSON-RPC calls to one agent over aiohttp (TLS optional);
* ``poller``: one worker per host: events, resynchronisation, status;
* ``jobs``: jobs, steps, retries and resource locks;
* ``views``: aggregated, partial-result views;
* ``api``: the verb handlers; ``app``: the aiohttp application;
* ``main``: the ``vdsm-engine`` command (``serve`` and ``call``).
"""
