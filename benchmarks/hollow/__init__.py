"""Hollow agents: one process serving the real agent API for N simulated hosts.

A load generator for scale tests of the engine (as control planes are tested
with hollow nodes): every host answers the verbs the engine uses, from
in-memory tasks and storage connections, with an events feed of its own
(epochs, sequence numbers, gaps, long-poll: the agent's ``EventFeed``) and
background activity at configured rates; hosts can be frozen (like SIGSTOP),
killed (connections refused) and restarted (a new epoch) on command.

* ``state``: one host's tasks, connections and feed;
* ``verbs``: the agent verbs, answering encoded JSON;
* ``generator``: events at rates (task transitions, progress, connection flips);
* ``server``: the sockets (a port or a path per host), the control API;
* ``control``: the control client, the hosts file, ``addHost`` for an engine;
* ``bench``: CPU and memory of the hollow process and of an engine following it;
* ``__main__``: ``python -m benchmarks.hollow [serve|ctl|register|bench]``.

Not part of the product: nothing in ``vdsm_agent`` imports it. See
docs/benchmarks.md ("Hollow agents").
"""
