"""The engine's step and job state machines: one transition table each
(``engine/states.py``), every edge and every non-edge, and no code that writes a
step's or a job's state other than the one function of each machine
(``store.steps.move_step``, ``store.steps.move_job``)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from tests.engine_support import database_url, postgres_server  # noqa: F401
from vdsm_agent import errors
from vdsm_agent.engine import states, views
from vdsm_agent.engine.states import (
    JOB_TRANSITIONS,
    STEP_TRANSITIONS,
    IllegalMove,
    JobState,
    StepState,
    check_job_move,
    check_step_move,
    job_state,
)
from vdsm_agent.engine.store import EngineStore, repository
from vdsm_agent.engine.store.models import JobRow, StepRow

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "vdsm_agent" / "engine"
T0 = 1_700_000_000.0

# -- the tables: every edge, and every non-edge -----------------------------------------------

STEP_EDGES = {
    ("pending", "running"), ("pending", "done"), ("pending", "failed"),
    ("pending", "canceled"),
    ("running", "done"), ("running", "failed"), ("running", "canceled"),
    # staying unfinished is no move (a step accepted twice stays running)
    ("pending", "pending"), ("running", "running"),
}
JOB_EDGES = {
    ("pending", "running"), ("pending", "done"), ("pending", "failed"),
    ("pending", "partial"),
    ("running", "done"), ("running", "failed"), ("running", "partial"),
    ("pending", "pending"), ("running", "running"),
}
STEP_PAIRS = [(a.value, b.value) for a in StepState for b in StepState]
JOB_PAIRS = [(a.value, b.value) for a in JobState for b in JobState]


def test_state_names_are_the_contract() -> None:
    assert [s.value for s in StepState] == ["pending", "running", "done", "failed", "canceled"]
    assert [s.value for s in JobState] == ["pending", "running", "done", "failed", "partial"]
    assert set(STEP_TRANSITIONS) == set(StepState)
    assert set(JOB_TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(("source", "target"), STEP_PAIRS)
def test_step_table_edge(source: str, target: str) -> None:
    if (source, target) in STEP_EDGES:
        check_step_move(StepState(source), StepState(target))
    else:
        with pytest.raises(IllegalMove, match=f"step: {source} -> {target} is not allowed"):
            check_step_move(StepState(source), StepState(target))


@pytest.mark.parametrize(("source", "target"), JOB_PAIRS)
def test_job_table_edge(source: str, target: str) -> None:
    if (source, target) in JOB_EDGES:
        check_job_move(JobState(source), JobState(target))
    else:
        with pytest.raises(IllegalMove, match=f"job: {source} -> {target} is not allowed"):
            check_job_move(JobState(source), JobState(target))


def test_final_states_have_no_way_out() -> None:
    for step in states.STEP_FINAL:
        assert STEP_TRANSITIONS[StepState(step)] == frozenset()
    for job in states.JOB_FINAL:
        assert JOB_TRANSITIONS[JobState(job)] == frozenset()


def test_every_legal_step_move_makes_a_legal_job_move() -> None:
    """A job's state is derived from its steps' (``job_state``): whatever legal move
    any of a three-step job's steps makes, the job's own move is in its table."""
    for before in itertools.product(list(StepState), repeat=3):
        for index, step in enumerate(before):
            for target in STEP_TRANSITIONS[step]:
                after = list(before)
                after[index] = target
                check_job_move(job_state(list(before)), job_state(after))


# -- one writer per machine ------------------------------------------------------------------

# The functions allowed to write a step's or a job's state column: the move functions,
# and the creation of a job with its steps (pending, the start of both machines).
WRITERS = {"move_step", "move_job", "create_job"}
ROW_CLASSES = {"StepRow", "JobRow"}


def _state_writes(tree: ast.Module) -> list[tuple[str, int]]:
    """(function, line) of every write of a step's or job's ``state`` in a module:
    ``x.state = ...``, and ``StepRow``/``JobRow`` ``.update/.create/.insert...``
    (or ``.replace``) given a ``state`` keyword or a ``{"state": ...}`` row."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr == "state" for t in targets):
                found.append((function, node.lineno))
        if isinstance(node, ast.Call) and _row_write(node):
            found.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def _row_write(call: ast.Call) -> bool:
    func = call.func
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and func.value.id in ROW_CLASSES):
        return False
    if func.attr not in {"update", "create", "insert", "insert_many", "replace",
                         "replace_many", "get_or_create"}:
        return False
    keywords = {keyword.arg for keyword in call.keywords}
    rows = [arg for arg in call.args if isinstance(arg, ast.Dict)]
    return "state" in keywords or any(
        isinstance(key, ast.Constant) and key.value == "state"
        for row in rows for key in row.keys)


def _engine_modules_with_rows() -> dict[str, ast.Module]:
    """The engine's modules that use the step or job table."""
    found = {}
    for path in sorted(ENGINE.rglob("*.py")):
        text = path.read_text()
        if any(name in text for name in ROW_CLASSES):
            found[path.relative_to(ROOT).as_posix()] = ast.parse(text)
    return found


def test_only_the_move_functions_write_a_step_or_job_state() -> None:
    modules = _engine_modules_with_rows()
    assert "vdsm_agent/engine/store/steps.py" in modules
    writes = {(name, function) for name, tree in modules.items()
              for function, _line in _state_writes(tree)}
    outside = {(name, function) for name, function in writes if function not in WRITERS}
    assert outside == set(), "write step/job states through move_step/move_job"
    # The check sees what it looks for: the writers themselves are found.
    assert {function for _name, function in writes} == WRITERS


def test_the_write_check_sees_each_form_of_write() -> None:
    source = '''
def a(step):
    step.state = "done"
def b():
    StepRow.update(state="done").execute()
def c():
    JobRow.insert_many([{"id": "j"}]).execute()
    JobRow.insert({"state": "done"}).execute()
def d():
    HostTaskRow.update(state="done").execute()
'''
    assert _state_writes(ast.parse(source)) == [("a", 3), ("b", 5), ("c", 8)]


# -- the move functions, in a real store ----------------------------------------------------


@pytest.fixture
async def store(database_url: str):  # noqa: F811
    opened = await EngineStore.open(database_url)
    try:
        yield opened
    finally:
        await opened.close()


async def _one_step_job(store: EngineStore) -> None:
    await store.run(repository.add_host, "h1", "http://127.0.0.1:1/jsonrpc", None, None,
                    None, False, T0)
    spec = repository.StepSpec("h1", "manageStorageConnection", {"connectionID": "c"},
                               connection_id="c")
    await store.run(repository.create_job, "j", "manageStorageConnection", {}, [spec],
                    ["s1"], [], T0)


async def test_an_illegal_job_move_raises_and_changes_nothing(store: EngineStore) -> None:
    await _one_step_job(store)
    await store.run(repository.step_accepted, "s1", StepState.DONE, T0 + 1)
    job = await views.get_job(store, "j")
    assert (job["state"], job["endedAt"] is not None) == ("done", True)

    def move_back() -> None:
        with store.atomic():
            repository.move_job(JobRow.get_by_id("j"), JobState.RUNNING, T0 + 2)

    with pytest.raises(IllegalMove, match="job j: done -> running is not allowed"):
        await store.run(move_back)
    again = await views.get_job(store, "j")
    assert again == job
    # Recomputing a finished job (its steps did not move) is no move, not an error.
    await store.run(repository.recompute_jobs, ["j"], T0 + 3)
    assert await views.get_job(store, "j") == job


async def test_an_illegal_step_move_raises_and_changes_nothing(store: EngineStore) -> None:
    await _one_step_job(store)
    await store.run(repository.step_failed, "s1", {"name": "InvalidUri"}, T0 + 1)

    def revive() -> None:
        with store.atomic():
            repository.move_step(StepRow.get_by_id("s1"), StepState.RUNNING, T0 + 2)

    before = await views.get_job(store, "j")
    with pytest.raises(IllegalMove, match="step s1: failed -> running is not allowed"):
        await store.run(revive)
    assert await views.get_job(store, "j") == before
    # The public writers leave a final step alone (no move, no error, no job woken).
    assert await store.run(repository.step_accepted, "s1", StepState.DONE, T0 + 3) == set()
    assert await views.get_job(store, "j") == before


async def test_a_job_moves_with_its_steps(store: EngineStore) -> None:
    await _one_step_job(store)
    assert (await views.get_job(store, "j"))["state"] == "pending"
    # A removed host fails its steps: the job ends (pending -> failed in one move).
    assert await store.run(repository.remove_host, "h1", T0 + 1) == {"j"}
    job = await views.get_job(store, "j")
    assert (job["state"], job["steps"][0]["state"]) == ("failed", "failed")
    assert job["steps"][0]["lastError"]["name"] == errors.Failure.HOST_REMOVED.value
