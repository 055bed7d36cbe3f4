"""reload_plan: what a reload opens, closes, keeps and drains; how closes are spread in time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wsproxy.config import Address, parse_config
from wsproxy.policy.reload_plan import drain_window, plan_reload, rebalance_victim, spread


def cfg(listeners: list[int], pools: dict[str, list[int]]) -> object:
    lines = ["listeners:"]
    first = next(iter(pools))
    for port in listeners:
        lines += [f"  - address: 127.0.0.1:{port}", f"    pool: {first}"]
    lines.append("pools:")
    for name, ports in pools.items():
        lines += [f"  {name}:", "    backends:"] + [f"      - 127.0.0.1:{p}" for p in ports]
    return parse_config("\n".join(lines) + "\n", source="t.yaml")


def a(port: int) -> Address:
    return Address("127.0.0.1", port)


def test_unchanged_config_keeps_everything_and_drops_nothing() -> None:
    old = cfg([8080], {"chat": [9001, 9002]})
    plan = plan_reload(old, cfg([8080], {"chat": [9001, 9002]}))
    assert plan.open == () and plan.close == ()
    assert [lst.address for _, lst in plan.keep] == [a(8080)]
    assert plan.removed == frozenset()
    assert not plan.drops("chat", a(9001))


def test_listeners_are_opened_closed_and_kept_by_address() -> None:
    plan = plan_reload(cfg([8080, 8081], {"chat": [9001]}), cfg([8081, 8082], {"chat": [9001]}))
    assert [lst.address for _, lst in plan.open] == [a(8082)]
    assert plan.close == (a(8080),)
    assert [lst.address for _, lst in plan.keep] == [a(8081)]


def test_ephemeral_port_listeners_are_matched_by_position() -> None:
    plan = plan_reload(cfg([0, 0], {"chat": [9001]}), cfg([0], {"chat": [9001]}))
    assert [k for k, _ in plan.keep] == [(a(0), 0)]
    assert plan.close == ((a(0), 1),)


def test_a_removed_backend_drops_only_its_own_sessions() -> None:
    plan = plan_reload(cfg([8080], {"chat": [9001, 9002, 9003]}), cfg([8080], {"chat": [9001, 9003]}))
    assert plan.removed == frozenset({("chat", a(9002))})
    assert plan.drops("chat", a(9002))
    assert not plan.drops("chat", a(9001))
    assert not plan.drops("other", a(9002))
    assert not plan.drops(None, None)


def test_a_removed_pool_drops_all_its_backends() -> None:
    old = cfg([8080], {"chat": [9001], "feed": [9005, 9006]})
    plan = plan_reload(old, cfg([8080], {"chat": [9001]}))
    assert plan.removed == frozenset({("feed", a(9005)), ("feed", a(9006))})


def test_a_backend_moved_to_another_pool_is_dropped_from_the_old_pool() -> None:
    plan = plan_reload(cfg([8080], {"chat": [9001], "feed": [9002]}), cfg([8080], {"chat": [9001, 9002]}))
    assert plan.removed == frozenset({("feed", a(9002))})


def test_spread_is_flat_over_the_window() -> None:
    offsets = spread(10, 30.0, [0.5] * 10)
    assert offsets == [1.5 + 3.0 * i for i in range(10)]


@given(
    st.integers(min_value=1, max_value=300),
    st.floats(min_value=0.001, max_value=3600),
    st.data(),
)
def test_spread_puts_each_close_in_its_own_slot(count: int, window: float, data: st.DataObject) -> None:
    units = data.draw(st.lists(st.floats(min_value=0, max_value=1), min_size=count, max_size=count))
    offsets = spread(count, window, units)
    slot = window / count
    assert len(offsets) == count
    assert offsets == sorted(offsets)
    for i, off in enumerate(offsets):
        assert i * slot <= off < (i + 1) * slot + 1e-9
    # never more than two closes inside any one slot's length
    for i in range(count - 2):
        assert offsets[i + 2] - offsets[i] > slot - 1e-9


def test_spread_of_nothing_or_no_window() -> None:
    assert spread(0, 30.0, []) == []
    assert spread(3, 0.0, [0.1, 0.2, 0.3]) == [0.0, 0.0, 0.0]


def test_shutdown_window_leaves_time_for_the_last_closing_handshake() -> None:
    assert drain_window(30.0, 40.0, 5.0) == 30.0
    assert drain_window(30.0, 10.0, 5.0) == 5.0
    assert drain_window(30.0, 2.0, 3.0) == 0.0


def test_added_backends_are_listed() -> None:
    plan = plan_reload(cfg([8080], {"chat": [9001]}), cfg([8080], {"chat": [9001, 9002]}))
    assert plan.added == frozenset({("chat", a(9002))})


def test_rebalance_moves_from_the_most_loaded_until_within_weight() -> None:
    assert rebalance_victim([(10, 1), (0, 1)]) == 0
    assert rebalance_victim([(5, 1), (5, 1)]) is None
    assert rebalance_victim([(6, 1), (5, 1)]) is None  # within one session of its share
    assert rebalance_victim([(10, 1), (10, 2), (0, 1)]) == 0
    assert rebalance_victim([]) is None and rebalance_victim([(0, 1)]) is None
    assert rebalance_victim([(27, 1), (27, 1), (27, 1), (111, 4)]) is None  # 27.75 per weight: as even as it gets


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 10)), min_size=1, max_size=12))
def test_rebalancing_converges_when_each_move_lands_on_the_least_loaded(loads: list[tuple[int, int]]) -> None:
    loads = [list(x) for x in loads]  # type: ignore[misc]
    for _ in range(sum(a for a, _ in loads) + 1):
        victim = rebalance_victim([tuple(x) for x in loads])  # type: ignore[misc]
        if victim is None:
            break
        loads[victim][0] -= 1
        target = min(range(len(loads)), key=lambda i: (loads[i][0] + 1) / loads[i][1])
        loads[target][0] += 1
    else:
        raise AssertionError("did not converge")
    # within weight: no backend would be better off giving one session to another
    for v, (av, wv) in enumerate(loads):
        assert all((a + 1) / w >= av / wv for i, (a, w) in enumerate(loads) if i != v)
