"""A fleet of Asterisk boxes on a real three-node MariaDB Galera cluster.

Each box is a config of its own (its spool, its list of nodes, its own
node first), and every call is the real astbill.py.  SELECT ... FOR UPDATE
locks on one node only: what keeps one account from being overspent across
nodes is that every authorization writes the account row, so the cluster's
certification refuses the later one and AstBill runs it again whole.
"""
import threading
import time
from decimal import Decimal

import pytest

from agipeer import Scenario
from conftest import RATES, Billing, invariants, place_call, running_cluster, start_held_call

BOXES = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, "fleet")


_databases = iter(range(1, 1000))


def fleet(cluster, tmp_path, **settings):
    """(database name, BOXES boxes on it, box i listing node i first)."""
    name = f"fleet{next(_databases)}"
    urls = cluster.create_database(name)
    boxes = []
    for i in range(BOXES):
        path = tmp_path / f"box{i}"
        path.mkdir()
        box = Billing(path, urls[i:] + urls[:i], **settings)
        box.backend = "mariadb"
        boxes.append(box)
    boxes[0].admin_ok("init-db")
    boxes[0].setup_rates(RATES)
    return name, boxes


def settled_in(calls, seconds=90):
    """Wait until every call has reached its Dial or ended (refused)."""
    deadline = time.monotonic() + seconds
    while not all(c.dial_reached.is_set() or c.finished for c in calls):
        assert time.monotonic() < deadline, "calls neither dialled nor refused"
        time.sleep(0.1)


def test_sixty_calls_over_three_nodes_never_overspend_one_account(cluster, tmp_path):
    database, boxes = fleet(cluster, tmp_path, max_call_secs=120)
    boxes[0].admin_ok("account", "add", "pool", "--balance", "1.00")
    boxes[0].admin_ok("account", "add", "1001", "--balance", "10")
    conflicts_before = sum(int(cluster.status(i, "wsrep_local_cert_failures"))
                           for i in cluster.live)
    gate = threading.Event()
    calls = [start_held_call(boxes[i % BOXES], gate, account="pool", answered_ms=30_000 + 1000 * i)
             for i in range(60)]
    overdrawn, stop = [], threading.Event()

    def watch(node):  # on every node, at no moment may reservations exceed the balance
        while not stop.is_set():
            for balance, reserved in cluster.sql(
                    node, f"SELECT balance, reserved FROM {database}.astaccount"):
                if Decimal(reserved) > Decimal(balance):
                    overdrawn.append((node, balance, reserved))
            time.sleep(0.05)

    watchers = [threading.Thread(target=watch, args=(n,)) for n in range(3)]
    for w in watchers:
        w.start()
    settled_in(calls)
    gate.set()
    results = [c.wait() for c in calls]
    stop.set()
    for w in watchers:
        w.join()
    statuses = [r.variables_set.get("ASTBILL_STATUS") for r in results]
    assert overdrawn == []
    assert set(statuses) <= {"OK", "NOFUNDS"}, [r.verbose for r in results if r.verbose][:3]
    assert statuses.count("OK") == 8       # 1.00 reserves eight 2-minute calls at 0.12
    cdrs = invariants(boxes[1], {"pool": Decimal("1.00"), "1001": Decimal("10")})
    assert sorted(c["uniqueid"] for c in cdrs) == sorted(
        call.uniqueid for call, s in zip(calls, statuses) if s == "OK")
    conflicts = sum(int(cluster.status(i, "wsrep_local_cert_failures")) for i in cluster.live)
    print(f"certification conflicts retried: {conflicts - conflicts_before}")


def test_a_node_killed_mid_run_loses_nothing(cluster, tmp_path):
    _, boxes = fleet(cluster, tmp_path, max_call_secs=300)
    for i in range(BOXES):
        boxes[0].admin_ok("account", "add", f"acc{i}", "--balance", "10")
    gate = threading.Event()
    talk = {}
    calls = []
    for n in range(18):
        box = boxes[n % BOXES]
        talk_ms = 61_000 + 7_000 * n
        call = start_held_call(box, gate, account=f"acc{n % BOXES}", answered_ms=talk_ms)
        talk[call.uniqueid] = talk_ms
        calls.append((box, call))
    settled_in([c for _, c in calls])
    assert all(c.dial_reached.is_set() for _, c in calls), [
        c.wait().verbose for _, c in calls if not c.dial_reached.is_set()]
    cluster.kill(1)                       # mid-run: every call is up
    gate.set()
    results = [(box, c.wait()) for box, c in calls]
    assert all(r.returncode == 0 for _, r in results)
    evicted = cluster.wait_evicted(60)
    # The boxes whose first node is dead still work, through the next node.
    after = [place_call(box, Scenario(answered_ms=61_000), account=f"acc{i}")
             for i, box in enumerate(boxes)]
    assert [r.variables_set["ASTBILL_STATUS"] for r in after] == ["OK"] * BOXES, [
        r.verbose for r in after]
    for box in boxes:                      # each box replays its own spool
        assert box.admin_process("sweep").returncode == 0
    expected = {u: (Decimal("0.06") * -(-(ms // 1000) // 60)).quantize(Decimal("0.0001"))
                for u, ms in talk.items()}
    charged = {u: boxes[0].cdr(u) for u in expected}
    assert {u: (c["state"], c["cost"]) for u, c in charged.items()} == {
        u: ("settled", cost) for u, cost in expected.items()}
    spooled = sum(len(list(box.spool.glob("*.call"))) for box in boxes)
    assert spooled == 0
    invariants(boxes[2], {f"acc{i}": Decimal("10") for i in range(BOXES)})
    print(f"evicted after {evicted:.1f}s; spooled then replayed:"
          f" {sum('spooled' in ' '.join(r.verbose) for _, r in results)}")
