"""Kill campaigns against bigipc's queues: SIGKILL at random moments.

What bigipc promises for a process killed with SIGKILL at any moment (in
the middle of putting or getting a 64 MiB item, or while holding one of
the queue's locks): the queue is neither deadlocked nor corrupted for the
other processes, they go on, and every item that was not in the killed
process's hands arrives, intact, exactly once. What a killed process had
in its hands is lost:

* a killed producer: the item it was putting, and items its feeder thread
  had not yet handed to the kernel. The feeder keeps each process's records
  in order, so small items arrive as a prefix of what it put; a large item
  travels through a pipe of its own that the feeder may still be filling
  while later records go out, so such an item can be missing from the
  middle of that prefix (it was still being handed over when the
  producer died);
* a killed consumer: at most the one item it was getting (or had got and
  not yet reported); with ``put_many``, at most one batch (one record).

Each campaign keeps one queue, survivor producers and consumers running
all along, and starts a fresh victim per trial that it SIGKILLs after a
random delay, or right after the victim starts a 64 MiB put. Consumers
report each item to the parent as soon as they have it, over a stdlib
``multiprocessing`` Pipe (not the code under test). At the end the
survivors are stopped, the queue is drained, and the parent checks:

* no wait anywhere exceeded its bound (a hang fails the test);
* no item arrived twice, none arrived damaged, none arrived that was never
  put;
* every survivor's item arrived, except at most one item (one batch) per
  consumer killed; a victim producer's items arrived as described above;
* on a JoinableQueue, ``join()`` returns: it does not wait for items a
  killed producer never handed over;
* afterwards the queue still works: the parent puts and gets small, 1 MiB
  and 64 MiB items through it, and ``empty()``/``qsize()`` agree.

Two deterministic tests kill a producer at the moment the campaigns can
only hope to hit: while its feeder still holds most of a 64 MiB item.

A summary line per campaign shows with ``-s``. The default run is about a
minute on two cores. ``BIGIPC_KILL_TRIALS=N`` adds the long campaigns
(marked ``slow``): every scenario under every start method, N trials each,
with more survivors. ``BIGIPC_KILL_SEED`` fixes the random choices (kill
moments and targets; every result names the seed it ran with), though
the processes' own timing still varies from run to run. Children run the
core this process runs; tests/test_both_cores.py re-runs this file with
the pure-Python core.
"""

import collections
import multiprocessing
import multiprocessing.connection
import os
import queue
import random
import sys
import threading
import time

import pytest

import bigipc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _queue_children as qc

qc.make_importable_in_children()

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]

_ENV_TRIALS = int(os.environ.get("BIGIPC_KILL_TRIALS", "0") or 0)
SEED = int(os.environ.get("BIGIPC_KILL_SEED", "0") or 0) or random.SystemRandom().randrange(1, 1 << 31)

# Bounds on waits (seconds). Far above what each step takes; exceeding one
# is a hang and fails the test.
START_BOUND = 60.0  # a child says hello
KILL_BOUND = 15.0  # a SIGKILLed child is reaped, its report pipe closes
STOP_BOUND = 120.0  # survivors finish and hand everything over
DRAIN_BOUND = 180.0  # every item put is reported by a consumer
JOIN_BOUND = 10.0  # JoinableQueue.join() once every task is done
ROUNDTRIP_BOUND = 60.0  # the parent's own put/get after the campaign


def _test_timeout(trials, per_trial=6.0):
    return int(240 + trials * per_trial)


class Hang(AssertionError):
    """A bounded wait ran out."""


class Child:
    def __init__(self, name, role, proc, ctl):
        self.name = name
        self.role = role
        self.proc = proc
        self.ctl = ctl
        self.messages = []  # everything but "got" reports, in order
        self.got = []  # (pid, seq) this child reported
        self.eof = False
        self.implementation = None


class Campaign:
    """One queue, its survivor producers and consumers, and a victim per
    trial; the parent's record of everything they reported."""

    def __init__(self, scenario, method, trials, seed, spec):
        self.scenario = scenario
        self.method = method
        self.trials = trials
        self.seed = seed
        self.spec = spec
        self.rng = random.Random(seed)
        self.ctx = multiprocessing.get_context(method)
        if spec["queue"] == "joinable":
            self.q = bigipc.JoinableQueue()
        else:
            self.q = bigipc.Queue(maxsize=spec.get("maxsize", 0))
        self.joinable = spec["queue"] == "joinable"
        self.children = {}
        self.received = collections.Counter()  # (pid, seq) -> times reported
        self.damaged = []  # integrity errors consumers found
        self.failures = []  # errors children reported
        # per-trial records
        self.producer_victims = []  # dicts: pid, puts, sent, in_put, strategy
        self.consumer_victims = []  # dicts: name, got
        self.findings = []  # what went wrong, collected for one failure message

    # -- children -------------------------------------------------------------

    def start(self, name, role, target, *args):
        mine, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(self.q, theirs, *args), name=name, daemon=True)
        try:
            proc.start()
        finally:
            theirs.close()
        child = self.children[name] = Child(name, role, proc, mine)
        self.wait_until(lambda: child.implementation is not None, START_BOUND, "%s to start" % name)
        if child.implementation != bigipc.IMPLEMENTATION:
            raise AssertionError(
                "%s runs the %s core, this process the %s core"
                % (name, child.implementation, bigipc.IMPLEMENTATION)
            )
        return child

    def pump(self, timeout):
        """Take in every report that arrives within ``timeout`` seconds."""
        live = [c.ctl for c in self.children.values() if not c.eof]
        if not live:
            time.sleep(timeout)
            return
        by_conn = {c.ctl: c for c in self.children.values() if not c.eof}
        for conn in multiprocessing.connection.wait(live, timeout):
            child = by_conn[conn]
            try:
                while conn.poll(0):
                    self._handle(child, conn.recv())
            except EOFError:
                child.eof = True
            except OSError:
                # A child killed in the middle of writing a report: what it
                # reported is whatever came whole.
                child.eof = True

    def _handle(self, child, msg):
        kind = msg[0]
        if kind == "got":
            _, pid, seq, error = msg
            self.received[(pid, seq)] += 1
            child.got.append((pid, seq))
            if error:
                self.damaged.append("item %d/%d (got by %s): %s" % (pid, seq, child.name, error))
        elif kind == "hello":
            child.implementation = msg[4]
        elif kind == "error":
            self.failures.append("%s reported:\n%s" % (child.name, msg[1]))
        else:
            child.messages.append(msg)

    def wait_until(self, condition, bound, what):
        deadline = time.monotonic() + bound
        while not condition():
            if self.failures:
                raise AssertionError("\n".join(self.failures))
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang("hang: waited %s s for %s [%s]" % (bound, what, self.where()))
            self.pump(min(left, 0.05))

    def sleep(self, seconds):
        """Wait ``seconds`` while taking in reports."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.pump(min(left, 0.02))

    def kill(self, child):
        child.proc.kill()
        child.proc.join(KILL_BOUND)
        if child.proc.exitcode is None:
            raise Hang("hang: %s survived SIGKILL for %s s" % (child.name, KILL_BOUND))
        self.wait_until(lambda: child.eof, KILL_BOUND, "the report pipe of killed %s to close" % child.name)

    def finish(self, child, bound):
        child.proc.join(bound)
        if child.proc.exitcode is None:
            raise Hang("hang: %s did not exit within %s s [%s]" % (child.name, bound, self.where()))
        self.wait_until(lambda: child.eof, bound, "the report pipe of %s to close" % child.name)
        if self.failures:
            raise AssertionError("\n".join(self.failures))
        assert child.proc.exitcode == 0, "%s exited with %s" % (child.name, child.proc.exitcode)

    def cleanup(self):
        for child in self.children.values():
            if child.proc.is_alive():
                child.proc.kill()
        for child in self.children.values():
            child.proc.join(KILL_BOUND)
            child.ctl.close()
        self.q.close()

    def where(self):
        return "%s under %s, %s core, BIGIPC_KILL_SEED=%d" % (
            self.scenario,
            self.method,
            bigipc.IMPLEMENTATION,
            SEED,
        )

    # -- the campaign -----------------------------------------------------------

    def run(self):
        spec = self.spec
        many = spec.get("many", False)
        producer_pids = list(spec["producers"])
        self.survivor_producers = [
            self.start("p%d" % pid, "producer", qc.producer, pid, spec["throttle"], spec["pace"], many)
            for pid in producer_pids
        ]
        self.survivor_consumers = [
            self.start("c%d" % i, "consumer", qc.consumer, "c%d" % i, self.joinable, spec["get_many"], i)
            for i in range(spec["consumers"])
        ]
        for trial in range(self.trials):
            role = spec["victims"]
            if role == "alternate":
                role = ("producer", "consumer")[trial % 2]
            if role == "producer":
                self.producer_trial(trial, many)
            else:
                self.consumer_trial(trial)
        self.stop_producers()
        if self.joinable:
            self.check_join()
        self.stop_consumers()
        self.account()
        self.after_the_campaign()

    def producer_trial(self, trial, many):
        base = qc.TINY_VICTIM_BASE if many else qc.VICTIM_BASE
        pid = base + trial
        victim = self.start("vp%d" % trial, "victim-producer", qc.victim_producer, pid, 16, 0.0, many)
        aim = "random" if many else self.rng.choice(["random", "put", "sent"])
        if aim == "random":
            strategy = "at random"
            self.sleep(self.rng.uniform(0.0, 0.5))
        else:
            # Aim at a 64 MiB item: kill soon after the victim starts to put
            # one, or soon after put() returned (its feeder still writing
            # the item into the item's pipe while a consumer reads it).
            if aim == "put":
                strategy, delay = "after a 64 MiB put() started", self.rng.uniform(0.0, 0.15)
            else:
                strategy, delay = "after a 64 MiB put() returned", self.rng.uniform(0.0, 0.05)

            def big_put():
                return any(m[0] == aim and qc.size_for(pid, m[1]) >= qc.BIG for m in victim.messages)

            try:
                self.wait_until(big_put, 10.0, "a 64 MiB put")
            except Hang:
                strategy = "at random (no 64 MiB put came)"
            self.sleep(delay)
        self.kill(victim)
        puts = [(m[1], m[2]) for m in victim.messages if m[0] == "put"]
        sent = {m[1] for m in victim.messages if m[0] == "sent"}
        in_put = puts[-1] if puts and puts[-1][0] not in sent else None
        self.producer_victims.append(
            {"pid": pid, "puts": puts, "sent": sent, "in_put": in_put, "strategy": strategy}
        )

    def consumer_trial(self, trial):
        name = "vc%d" % trial
        victim = self.start(name, "victim-consumer", qc.consumer, name, self.joinable, 0, trial)
        self.sleep(self.rng.uniform(0.0, 0.6))
        self.kill(victim)
        self.consumer_victims.append({"name": name, "got": len(victim.got)})

    def stop_producers(self):
        for child in self.survivor_producers:
            child.ctl.send("stop")
        for child in self.survivor_producers:
            self.wait_until(
                lambda c=child: any(m[0] == "flushed" for m in c.messages),
                STOP_BOUND,
                "producer %s to stop and hand over its items" % child.name,
            )
            self.finish(child, STOP_BOUND)
        self.produced = {}
        for child in self.survivor_producers:
            done = [m for m in child.messages if m[0] == "done"]
            self.produced[int(child.name[1:])] = done[0][1]

    def survivors_items(self):
        return {(pid, seq) for pid, count in self.produced.items() for seq in range(count)}

    def check_join(self):
        """Every survivor item reported (and so marked done): join() must
        return, whatever the killed producers left behind."""
        expected = self.survivors_items()
        self.wait_until(
            lambda: expected <= set(self.received),
            DRAIN_BOUND,
            "consumers to report every survivor item",
        )
        try:
            self.q.join(timeout=JOIN_BOUND)
        except TimeoutError as exc:
            handed = []
            for v in self.producer_victims:
                for s in self.victim_lost(v):
                    if s in v["sent"]:
                        handed.append(
                            "%d/%d (%d bytes, %s)" % (v["pid"], s, qc.size_for(v["pid"], s), v["strategy"])
                        )
            self.findings.append(
                "JoinableQueue.join() did not return within %s s although every item that arrived "
                "was marked done: %s. Items of killed producers whose put() had returned but that "
                "never arrived: %s" % (JOIN_BOUND, exc, ", ".join(handed) or "none")
            )

    def stop_consumers(self):
        """One sentinel per survivor consumer, the next once one has left."""
        left = list(self.survivor_consumers)
        while left:
            self.q.put(None)
            self.wait_until(
                lambda: any(any(m[0] == "bye" for m in c.messages) for c in left),
                DRAIN_BOUND,
                "a consumer to take the sentinel",
            )
            for child in [c for c in left if any(m[0] == "bye" for m in c.messages)]:
                left.remove(child)
                self.finish(child, STOP_BOUND)

    # -- accounting -------------------------------------------------------------

    def victim_lost(self, victim):
        """Seqs a victim producer started to put that no consumer reported."""
        started = [s for seq, n in victim["puts"] for s in range(seq, seq + n)]
        return [s for s in started if (victim["pid"], s) not in self.received]

    def account(self):
        assert not self.failures, "\n".join(self.failures)
        assert not self.damaged, "damaged items [%s]:\n%s" % (self.where(), "\n".join(self.damaged[:20]))
        dups = sorted(k for k, v in self.received.items() if v > 1)
        assert not dups, "items delivered more than once [%s]: %s" % (self.where(), dups[:20])
        many = self.spec.get("many", False)
        victims = {v["pid"]: v for v in self.producer_victims}
        survivors = self.survivors_items()
        known = set(survivors)
        for v in self.producer_victims:
            known.update((v["pid"], s) for seq, n in v["puts"] for s in range(seq, seq + n))
        phantom = sorted(set(self.received) - known)
        assert not phantom, "items nobody put (or put after a producer said it stopped) [%s]: %s" % (
            self.where(),
            phantom[:20],
        )

        # Losses that only a killed consumer can explain, counted in records
        # (single items, or put_many batches).
        unexplained = []
        missing_survivor = sorted(survivors - set(self.received))
        if many:
            broken = set()
            for pid, seq in missing_survivor:
                broken.add((pid, _batch_of(pid, seq)))
            unexplained += ["survivor batch %d/%d" % b for b in sorted(broken)]
        else:
            unexplained += ["survivor item %d/%d" % k for k in missing_survivor]

        stats = collections.Counter()
        for pid, v in victims.items():
            got = sorted(s for (p, s) in self.received if p == pid)
            top = got[-1] if got else -1
            lost = self.victim_lost(v)
            stats["victim items lost"] += len(lost)
            if v["in_put"] is not None:
                stats["killed inside put()"] += 1
                seq, n = v["in_put"]
                if n == 1 and qc.size_for(pid, seq) >= qc.BIG:
                    stats["killed inside a 64 MiB put()"] += 1
            if any(qc.size_for(pid, s) >= qc.BIG for s in lost):
                stats["kills that cost a 64 MiB item"] += 1
            stats["items lost after put() returned"] += sum(s in v["sent"] for s in lost)
            if many:
                for seq, n in v["puts"]:
                    have = sum((pid, s) in self.received for s in range(seq, seq + n))
                    if seq <= top and have != n:
                        unexplained.append("victim %d batch at %d: %d of %d items" % (pid, seq, have, n))
            else:
                for s in lost:
                    if s > top:
                        continue  # still in the victim's hands when it died
                    if qc.is_large(qc.size_for(pid, s)):
                        stats["large items lost mid-transfer before later items"] += 1
                    else:
                        unexplained.append("victim %d item %d (later items arrived)" % (pid, s))

        consumer_kills = len(self.consumer_victims)
        for item in missing_survivor:
            if qc.size_for(*item) >= qc.BIG:
                stats["consumer kills that cost a 64 MiB item"] += 1
        assert len(unexplained) <= consumer_kills, (
            "lost %d records that were not in a killed process's hands (%d consumers were killed) [%s]:\n%s"
            % (len(unexplained), consumer_kills, self.where(), "\n".join(unexplained[:30]))
        )
        stats["records lost with killed consumers"] = len(unexplained)
        self.stats = stats
        self.survivor_count = len(survivors)
        self.consumer_kills = consumer_kills
        # Items that were put (or begun) and never arrived anywhere.
        self.lost_items = len(missing_survivor) + stats["victim items lost"]

    def after_the_campaign(self):
        """The queue is drained and still works for a process that used it
        all along (the parent)."""
        q = self.q
        assert q.empty(), "items left in the queue after every consumer stopped [%s]" % self.where()
        qsize = q.qsize()
        # A consumer killed between taking a record and counting it leaves
        # the count high by that record's items: one item, or a whole
        # put_many batch. Those items never arrived anywhere, so they are
        # among the lost ones. Nothing else may leave the count high.
        per_record = qc.MAX_BATCH if self.spec.get("many", False) else 1
        limit = min(self.consumer_kills * per_record, self.lost_items)
        assert 0 <= qsize <= limit, "qsize() is %d after draining, at most %d explained [%s]" % (
            qsize,
            limit,
            self.where(),
        )
        try:
            roundtrip(q, self.joinable)
        except Exception as exc:
            raise AssertionError(
                "the queue no longer works after the campaign [%s]: %r" % (self.where(), exc)
            ) from exc
        if self.joinable and not self.findings:
            q.join(timeout=JOIN_BOUND)
        assert q.empty()

    def summary(self):
        s = self.stats
        kinds = collections.Counter(v["strategy"] for v in self.producer_victims)
        return (
            "\nkill campaign %-16s %-10s %-6s core: trials=%d producer kills=%d (%s) consumer kills=%d; "
            "inside put()=%d, inside a 64 MiB put()=%d, kills costing a 64 MiB item=%d; "
            "victim items lost=%d (after put() returned=%d, large items lost mid-transfer before later "
            "ones=%d); "
            "consumer kills costing a 64 MiB item=%d, records lost with killed consumers=%d; "
            "survivor items=%d; hangs=0; BIGIPC_KILL_SEED=%d"
            % (
                self.scenario,
                self.method,
                bigipc.IMPLEMENTATION,
                self.trials,
                len(self.producer_victims),
                ", ".join("%d %s" % (n, k) for k, n in sorted(kinds.items())) or "-",
                len(self.consumer_victims),
                s["killed inside put()"],
                s["killed inside a 64 MiB put()"],
                s["kills that cost a 64 MiB item"],
                s["victim items lost"],
                s["items lost after put() returned"],
                s["large items lost mid-transfer before later items"],
                s["consumer kills that cost a 64 MiB item"],
                s["records lost with killed consumers"],
                self.survivor_count,
                SEED,
            )
        )


def roundtrip(q, joinable):
    """Put small, ~64 KiB, 1-3 MiB and 64 MiB items (bytes and numpy arrays)
    from a thread and get them here: all arrive intact, in order."""
    items = [qc.make_item(qc.FIXED_PRODUCERS[5], s) for s in (0, 4, 5, 7, 9)]
    items.append(qc.make_item(qc.ALTERNATING_PRODUCERS[1], 1))
    expected = [(i[0], i[1]) for i in items]
    errors = []

    def put_all():
        try:
            for item in items:
                q.put(item, timeout=ROUNDTRIP_BOUND)
        except BaseException as exc:  # reported below
            errors.append(repr(exc))

    putter = threading.Thread(target=put_all, daemon=True)
    putter.start()
    got = []
    try:
        for _ in expected:
            got.append(qc.check_item(q.get(timeout=ROUNDTRIP_BOUND)))
            if joinable:
                q.task_done()
    finally:
        putter.join(ROUNDTRIP_BOUND)
    assert not putter.is_alive(), "put() did not return within %s s" % ROUNDTRIP_BOUND
    assert not errors, errors
    assert [(p, s) for p, s, _ in got] == expected
    assert [e for _, _, e in got if e] == []


def _batch_of(pid, seq):
    k = start = 0
    while True:
        n = qc.batch_len(pid, k)
        if seq < start + n:
            return k
        start += n
        k += 1


# Scenarios. producers: ids of the survivor producers (their id range sets
# their size mix); throttle: producers keep qsize() at most about this;
# pace: their pause between puts; get_many: survivor consumers take up to
# that many items at a time (0: get()).
SCENARIOS = {
    # Victim producers (many 64 MiB items) among light survivors.
    "victim-producer": dict(
        queue="plain", victims="producer", producers=(0, 1), consumers=2, throttle=16, pace=0.002, get_many=0
    ),
    # Victim consumers among producers of many 64 MiB items.
    "victim-consumer": dict(
        queue="plain",
        victims="consumer",
        producers=(100, 101),
        consumers=2,
        throttle=6,
        pace=0.002,
        get_many=0,
    ),
    # maxsize 4: kills land while processes wait for room, hold a
    # reservation or the bound lock. Producers and consumers in turn.
    "bounded": dict(
        queue="plain",
        maxsize=4,
        victims="alternate",
        producers=(2, 3),
        consumers=2,
        throttle=0,
        pace=0.001,
        get_many=0,
    ),
    # join() must not wait for what killed producers never handed over.
    "joinable": dict(
        queue="joinable",
        victims="producer",
        producers=(4, 5),
        consumers=2,
        throttle=16,
        pace=0.002,
        get_many=0,
    ),
    # put_many batches (one record each), get_many in survivor consumers;
    # producers and consumers killed in turn.
    "put-many": dict(
        queue="plain",
        victims="alternate",
        producers=(200, 201),
        consumers=2,
        throttle=64,
        pace=0.002,
        get_many=20,
        many=True,
    ),
}


def run_campaign(scenario, method, trials, **overrides):
    spec = dict(SCENARIOS[scenario], **overrides)
    # One seed per campaign, derived from the run's seed, printed on failure.
    seed = random.Random("%d/%s/%s/%d" % (SEED, scenario, method, trials)).randrange(1, 1 << 31)
    campaign = Campaign(scenario, method, trials, seed, spec)
    try:
        campaign.run()
    finally:
        campaign.cleanup()
    if campaign.findings:
        pytest.fail(
            "[%s]\n%s\n%s" % (campaign.where(), "\n".join(campaign.findings), campaign.summary()),
            pytrace=False,
        )
    print(campaign.summary())
    return campaign


# --------------------------------------------------------------------------
# the same death, made certain


@pytest.mark.parametrize("kind", ["Queue", "JoinableQueue"])
@pytest.mark.timeout(120)
def test_producer_killed_while_its_feeder_writes_a_large_item(kind):
    """A producer puts a 64 MiB array, then a small item, and is killed
    while its feeder still holds most of the array (nobody reads yet, the
    array's pipe is full). The array is lost (it was still in the producer's
    hands); the small item after it arrives; nothing else is waited for:
    a JoinableQueue's join() returns once the small item is done."""
    ctx = multiprocessing.get_context("fork")
    q = bigipc.JoinableQueue() if kind == "JoinableQueue" else bigipc.Queue()
    pid = qc.ALTERNATING_PRODUCERS[0]
    assert qc.size_for(pid, 1) >= qc.BIG and qc.size_for(pid, 2) < qc.KiB * 4
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=qc.put_and_linger, args=(q, theirs, pid, [1, 2]), daemon=True)
    try:
        proc.start()
        theirs.close()
        reports = []
        while ("sent", 2, 1) not in reports:
            assert mine.poll(START_BOUND), "the producer did not put both items within %s s" % START_BOUND
            reports.append(mine.recv())
            assert reports[-1][0] != "error", reports[-1][1]
        proc.kill()
        proc.join(KILL_BOUND)
        assert proc.exitcode == -9
        got = qc.check_item(q.get(timeout=ROUNDTRIP_BOUND))
        assert got == (pid, 2, None), "expected the small item, intact: %r" % (got,)
        with pytest.raises(queue.Empty):
            q.get(timeout=0.5)
        assert q.empty()
        assert q.qsize() == 0
        if kind == "JoinableQueue":
            q.task_done()
            try:
                q.join(timeout=JOIN_BOUND)
                failure = None
            except TimeoutError as exc:
                failure = str(exc)
            if failure:
                pytest.fail(
                    "join() waits for the 64 MiB item the killed producer never finished handing "
                    "over: %s" % failure,
                    pytrace=False,
                )
        roundtrip(q, kind == "JoinableQueue")
        if kind == "JoinableQueue":
            q.join(timeout=JOIN_BOUND)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(KILL_BOUND)
        mine.close()
        q.close()


# --------------------------------------------------------------------------
# the default run: about a minute on two cores

DEFAULT = {"victim-producer": 12, "victim-consumer": 12, "bounded": 20, "joinable": 12, "put-many": 16}


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.timeout(_test_timeout(DEFAULT["victim-producer"]))
def test_killed_producer(method):
    run_campaign("victim-producer", method, DEFAULT["victim-producer"])


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.timeout(_test_timeout(DEFAULT["victim-consumer"]))
def test_killed_consumer(method):
    run_campaign("victim-consumer", method, DEFAULT["victim-consumer"])


@pytest.mark.parametrize("method", ["forkserver"])
@pytest.mark.timeout(_test_timeout(DEFAULT["bounded"]))
def test_killed_on_a_bounded_queue(method):
    if method not in START_METHODS:
        pytest.skip("no %s start method here" % method)
    run_campaign("bounded", method, DEFAULT["bounded"])


@pytest.mark.parametrize("method", ["fork"])
@pytest.mark.timeout(_test_timeout(DEFAULT["joinable"]))
def test_killed_producer_does_not_hold_up_join(method):
    run_campaign("joinable", method, DEFAULT["joinable"])


@pytest.mark.parametrize("method", ["fork"])
@pytest.mark.timeout(_test_timeout(DEFAULT["put-many"]))
def test_killed_with_put_many_batches(method):
    run_campaign("put-many", method, DEFAULT["put-many"])


# --------------------------------------------------------------------------
# long campaigns: every scenario under every start method, more survivors.
# Opt-in (a plain pytest run also runs tests marked slow): set
# BIGIPC_KILL_TRIALS to the number of trials per campaign.


@pytest.mark.slow
@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.timeout(_test_timeout(_ENV_TRIALS, per_trial=8.0))
def test_long_kill_campaign(scenario, method):
    if not _ENV_TRIALS:
        pytest.skip("long kill campaigns run with BIGIPC_KILL_TRIALS=N (N trials each)")
    spec = SCENARIOS[scenario]
    base = spec["producers"][0]
    run_campaign(scenario, method, _ENV_TRIALS, producers=(base, base + 50, base + 51), consumers=3)
