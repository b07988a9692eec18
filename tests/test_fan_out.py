"""pipeline.fan_out on the session's embedded Ray: every item once, in completion order, never more than
the window in flight, one bar counted in weights, and a failure that names its item.

No timing is assumed: a :class:`Ledger` actor decides which call may finish next (calls wait for their
turn), so the order results arrive in, and the most calls ever outstanding, are known in advance. (The
one test that sleeps does so to make a task's exit slow; what it checks holds however slow that is.)"""
from __future__ import annotations

import asyncio
import pathlib
import time

import pytest
import ray

import pipeline.fan_out as fan_out_module
from pipeline.fan_out import IN_FLIGHT_PER_CPU, TaskFailed, fan_out, fan_out_to_actors
from pipeline.ray_runtime import cluster_cpus
from shards.errors import DatasetDamaged, OnionError


@ray.remote(num_cpus=0)
class Ledger:
    """Counts calls submitted (by the driver) and finished (by the calls), and lets them finish only
    in ``order``: the call for ``order[turn]`` finishes; the test advances ``turn`` once it has its result."""

    def __init__(self, order: list) -> None:
        self.order, self.turn = list(order), 0
        self.outstanding = self.most = 0
        self.sent: list = []
        self.changed = asyncio.Condition()

    async def submitted(self, item: object) -> None:
        self.sent.append(item)
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)

    async def finish(self, item: object) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.turn < len(self.order) and self.order[self.turn] == item)
        self.outstanding -= 1

    async def advance(self) -> None:
        async with self.changed:
            self.turn += 1
            self.changed.notify_all()

    async def report(self) -> tuple[int, list]:
        return self.most, self.sent


@ray.remote(num_cpus=0)  # zero CPUs: the window, not the 2 CPUs of the test Ray, is what bounds the calls
def square(item: int, ledger: ray.actor.ActorHandle) -> int:
    ray.get(ledger.finish.remote(item))
    return item * item


@ray.remote(num_cpus=0)
def checked(item: str) -> str:
    if item == "bad":
        raise ValueError(f"cannot read {item}")
    if item == "damaged":
        raise DatasetDamaged(f"{item}.tar: member 'x.png': its bytes do not match the index")
    return item.upper()


@ray.remote(num_cpus=0)
class Worker:
    def run(self, item: int | str, ledger: ray.actor.ActorHandle | None) -> tuple[int | str, str]:
        if item == "damaged":
            raise DatasetDamaged(f"{item}.tar: its bytes do not match the index")
        if ledger is not None:
            ray.get(ledger.finish.remote(item))
        return item, ray.get_runtime_context().get_actor_id()


def reversed_blocks(count: int, block: int) -> list[int]:
    """0..count-1, each block of ``block`` reversed: an order in which no call finishes in submission
    order, and each call's turn comes while it is in flight (when at most ``block`` are)."""
    return [item for start in range(0, count, block) for item in reversed(range(start, min(count, start + block)))]


@pytest.mark.parametrize("window", [3, None])
def test_every_result_once_in_completion_order_and_never_more_than_the_window_in_flight(ray_local, window):
    limit = window or IN_FLIGHT_PER_CPU * cluster_cpus()  # None: the default, a few per CPU of the cluster
    items = list(range(3 * limit + 1))
    order = reversed_blocks(len(items), limit)
    ledger = Ledger.remote(order)

    def submit(item: int) -> ray.ObjectRef:
        ray.get(ledger.submitted.remote(item))
        return square.remote(item, ledger)

    arrived = []
    for item, result in fan_out(items, submit, desc="square", progress=False, max_in_flight=window):
        assert result == item * item
        arrived.append(item)
        ray.get(ledger.advance.remote())
    most, sent = ray.get(ledger.report.remote())
    assert arrived == order  # completion order, not the items' order
    assert sent == items  # submitted in the items' order, each once
    assert most == limit  # the window fills, and no call is submitted before another one has finished


def test_leaving_the_loop_early_submits_nothing_more_and_cancels_what_runs(ray_local):
    ledger = Ledger.remote([0])  # only item 0 ever gets its turn: the others wait until cancelled
    refs = {}

    def submit(item: int) -> ray.ObjectRef:
        ray.get(ledger.submitted.remote(item))
        refs[item] = square.remote(item, ledger)
        return refs[item]

    for item, _ in fan_out(list(range(10)), submit, desc="square", progress=False, max_in_flight=2):
        assert item == 0
        break
    _, sent = ray.get(ledger.report.remote())
    assert sent == [0, 1, 2]  # the window of 2, and the one that replaced item 0 before it was handed over
    for item in (1, 2):
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(refs[item], timeout=60)


@pytest.mark.parametrize("where", ["in the loop's body", "while waiting for results"])
def test_a_ctrl_c_leaves_what_runs_to_rays_shutdown_instead_of_cancelling_it(ray_local, monkeypatch, where):
    """Cancelling while the Ctrl-C also ends the workers' calls races their replies inside Ray (a core
    worker abort instead of exit 130): after a Ctrl-C, nothing is cancelled, whether it was raised in the
    caller's body (the CLI notes it before the loop is closed) or inside the loop itself."""
    monkeypatch.setattr(fan_out_module, "_interrupted", False)
    ledger = Ledger.remote([0, 1, 2])
    refs = {}

    def submit(item: int) -> ray.ObjectRef:
        ray.get(ledger.submitted.remote(item))
        refs[item] = square.remote(item, ledger)
        return refs[item]

    def pressed(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    if where == "while waiting for results":
        monkeypatch.setattr(fan_out_module.ray, "wait", pressed)
    loop = fan_out(list(range(10)), submit, desc="square", progress=False, max_in_flight=2)
    with pytest.raises(KeyboardInterrupt):
        for _ in loop:
            raise KeyboardInterrupt
    if where == "in the loop's body":
        fan_out_module.note_interruption()  # what the CLI's main does when the Ctrl-C reaches it
    loop.close()
    monkeypatch.undo()  # ray.wait back, for the test's own gets
    running = [1, 2] if where == "in the loop's body" else [0, 1]  # item 0 had its result handed over
    turn, results = 0, []  # the ledger's turn: still item 0's
    for item in running:  # each call's turn comes only after the one before it has finished
        while turn < item:
            ray.get(ledger.advance.remote())
            turn += 1
        results.append(ray.get(refs[item], timeout=60))  # a cancelled call raises TaskCancelledError here
    assert results == [item * item for item in running]


def test_the_bar_counts_weights_from_what_was_done_before(ray_local, monkeypatch):
    bars = []

    class RecordingBar(fan_out_module.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.settings = kwargs  # a disabled bar keeps none of them
            self.steps: list[float] = []
            bars.append(self)

        def update(self, n: float = 1) -> bool | None:
            self.steps.append(n)
            return super().update(n)

    monkeypatch.setattr(fan_out_module, "tqdm", RecordingBar)
    waves = ["ab", "c", "defg", ""]
    results = dict(fan_out(waves, checked.remote, desc="ingest x", unit="img", weight=len, initial=5))
    assert results == {wave: wave.upper() for wave in waves}
    [bar] = bars
    assert (bar.total, bar.initial, bar.n, bar.unit, bar.desc) == (5 + 7, 5, 5 + 7, "img", "ingest x")
    assert sorted(bar.steps) == [0, 1, 2, 4]  # one step per wave, its weight

    bars.clear()
    assert sorted(dict(fan_out(["a", "b", "c"], checked.remote, desc="phash", progress=False))) == ["a", "b", "c"]
    settings = bars[0].settings
    assert (settings["total"], settings["unit"], settings["disable"]) == (3, "shard", True)  # one per shard


def test_a_failed_call_names_its_item_and_keeps_the_type_of_what_it_raised(ray_local):
    with pytest.raises(ValueError, match=r"^phash: shard bad: ValueError: cannot read bad$") as raised:
        list(fan_out(["a", "bad", "c"], checked.remote, desc="phash", progress=False, label=lambda s: f"shard {s}"))
    failure = raised.value
    assert isinstance(failure, TaskFailed) and failure.item == "bad"
    assert type(failure.cause) is ValueError and str(failure.cause) == "cannot read bad"  # the task's own
    assert isinstance(failure.__cause__, ray.exceptions.RayTaskError)  # chained: Ray's remote traceback

    # An error written for a person stays one: its message as it is, its exit code for the CLI.
    with pytest.raises(DatasetDamaged) as raised:
        list(fan_out(["a", "damaged"], checked.remote, desc="exact", progress=False))
    assert str(raised.value) == "exact: damaged: damaged.tar: member 'x.png': its bytes do not match the index"
    assert isinstance(raised.value, OnionError) and raised.value.exit_code == DatasetDamaged.exit_code


def test_actors_each_run_one_call_at_a_time_in_completion_order(ray_local):
    items = list(range(6))
    order = reversed_blocks(len(items), 2)
    ledger = Ledger.remote(order)
    made = []

    def new_actor() -> ray.actor.ActorHandle:
        made.append(Worker.remote())
        return made[-1]

    def call(actor: ray.actor.ActorHandle, item: int) -> ray.ObjectRef:
        ray.get(ledger.submitted.remote(item))
        return actor.run.remote(item, ledger)

    arrived, actor_ids = [], set()
    for item, (echoed, actor_id) in fan_out_to_actors(items, new_actor, call, actors=2, desc="el2n", progress=False):
        assert echoed == item
        arrived.append(item)
        actor_ids.add(actor_id)
        ray.get(ledger.advance.remote())
    most, _ = ray.get(ledger.report.remote())
    assert arrived == order and most == 2 and len(made) == 2 and len(actor_ids) == 2


def test_actors_never_outnumber_the_items_and_their_failures_name_the_item(ray_local):
    made = []

    def new_actor() -> ray.actor.ActorHandle:
        made.append(Worker.remote())
        return made[-1]

    assert list(fan_out_to_actors([], new_actor, lambda actor, item: actor.run.remote(item, None), desc="embed")) == []
    assert made == []  # no shard, no actor (nor its model loaded)
    results = dict(fan_out_to_actors(["a", "b"], new_actor, lambda actor, item: actor.run.remote(item, None),
                                     actors=8, desc="embed", progress=False))
    assert sorted(results) == ["a", "b"] and len(made) == 2
    with pytest.raises(DatasetDamaged, match=r"^embed: damaged: damaged.tar: its bytes do not match the index$"):
        list(fan_out_to_actors(["a", "damaged"], new_actor, lambda actor, item: actor.run.remote(item, None),
                               actors=1, desc="embed", progress=False))


def test_leaving_an_actor_loop_early_submits_nothing_more(ray_local):
    ledger = Ledger.remote([0, 1, 2])

    def call(actor: ray.actor.ActorHandle, item: int) -> ray.ObjectRef:
        ray.get(ledger.submitted.remote(item))
        return actor.run.remote(item, ledger)

    for item, _ in fan_out_to_actors(list(range(6)), Worker.remote, call, actors=2, desc="el2n", progress=False):
        assert item == 0
        break  # cancels the calls still running (an actor's running call finishes: actors keep state)
    for _ in range(2):  # let them finish: the actors, released, exit after their last call
        ray.get(ledger.advance.remote())
    _, sent = ray.get(ledger.report.remote())
    assert sent == [0, 1, 2]


@ray.remote(num_cpus=0)
def writes_until_cancelled(folder: str) -> None:
    """Runs until cancelled; what it does on its way out (a last write) takes a moment."""
    started, finished = pathlib.Path(folder, "started"), pathlib.Path(folder, "finished")
    started.touch()
    try:
        while True:
            time.sleep(0.05)
    finally:
        time.sleep(0.5)
        finished.touch()


@ray.remote(num_cpus=0)
def fails_once_the_other_runs(folder: str) -> None:
    while not pathlib.Path(folder, "started").exists():
        time.sleep(0.05)
    raise ValueError("cannot read it")


def test_a_failure_is_reported_once_the_cancelled_tasks_have_ended(ray_local, tmp_path):
    """A caller cleans up after a failure (an ingest whose twin finished removes its bookkeeping): no task of
    the loop may still be writing by then, so the error comes only once the cancelled ones have ended."""
    calls = {"runs": writes_until_cancelled, "fails": fails_once_the_other_runs}
    with pytest.raises(TaskFailed, match="cannot read it"):
        for _ in fan_out(["runs", "fails"], lambda name: calls[name].remote(str(tmp_path)), desc="write",
                         progress=False, max_in_flight=2):
            pass
    assert (tmp_path / "finished").exists()
