"""Transport security and access control (docs/security.md).

* ``tls``: the server TLS context (client certificates required, TLS 1.2+).
* ``identity``: who a caller is — a certificate's names, a Unix socket
  peer's uid (``SO_PEERCRED``), a loopback TCP peer's uid — cached per
  connection, and the ``CURRENT_CALLER`` context variable handlers read.
* ``roles``: the roles (none < read < operate < admin) and the policy that maps
  identities to them (the ``[roles]`` section, built-in rules, defaults).
* ``gate``: the aiohttp middleware that identifies every request and guards
  the non-JSON-RPC routes (streams need ``read``).
* ``limits``: in-flight call limits, per connection and in total.
* ``audit``: one log line per mutating call and per refusal (logger
  ``vdsm_agent.audit``, optionally a file).
* ``redact``: secrets out of URIs, params, logs and errors.

This package imports nothing from ``vdsm_agent.server`` (the server imports it).
"""
