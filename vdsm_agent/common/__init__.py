"""Rules the agent, its task processes and the engine share, one home each.

* ``clock``: wall-clock time and the one RFC 3339 formatter and parser;
* ``paging``: page tokens of the list verbs (``listTasks``, the engine's lists);
* ``supervision``: background loops that survive a bug, and background jobs;
* ``backoff``: retry delays (capped exponential backoff with full jitter);
* ``settings``: the settings machinery (a table drives the INI file, the flags,
  the docs and the typed config); the agent's and the engine's tables use it.

The task child process imports ``clock``, so this ``__init__`` stays empty and
no module here imports the server, the store or the event-loop machinery at
import time.
"""
