"""Long-running operations (tasks): life cycle, runner, child entry, output, kinds.

This package is imported by the task child process too (``python -m
vdsm_agent.tasks.child``), so its ``__init__`` stays empty: the child must not
pay for importing the agent's server, store or event-loop machinery.
"""
