"""The side-by-side comparison as a pytest-benchmark suite.

One test per (transport, case) from the registries in ``bigipc._bench``:
the same producer and consumer processes, the same per-message checks, the
message counts of ``python -m bigipc bench --quick``. Each test starts one
session, warms it up with one run, then times ``ROUNDS`` runs of it. A
message that arrives different from what was sent fails the test.

pytest-benchmark reports seconds per run (a run moves ``extra_info
["messages"]`` messages); ``extra_info`` also holds the throughput measured
inside the processes, from the producer's first send to the consumer's last
receive.
"""

import statistics

import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install '.[bench]'")

from bigipc import _bench

ROUNDS = 3


def _registry_params(registry):
    return [pytest.param(item, id=name) for name, item in registry.items()]


@pytest.mark.parametrize("transport", _registry_params(_bench.TRANSPORTS))
@pytest.mark.parametrize("case", _registry_params(_bench.CASES))
def test_transfer(benchmark, case, transport):
    reason = case.unavailable() or transport.unavailable()
    if reason:
        pytest.skip(reason)
    if not transport.supports(case):
        pytest.skip("%s does not carry %s" % (transport.label, case.label))
    count = case.message_count(quick=True)
    runs = []

    with _bench.Session(transport, case, timeout=120) as session:
        session.run(count).raise_for_error()  # warm-up: builds the messages

        def one_run():
            runs.append(session.run(count).raise_for_error())

        benchmark.group = case.label
        benchmark.pedantic(one_run, rounds=ROUNDS, iterations=1, warmup_rounds=0)

    benchmark.extra_info.update(
        transport=transport.label,
        messages=count,
        message_bytes=case.size,
        mb_per_s_median=statistics.median(m.mb_per_s for m in runs),
        messages_per_s_median=statistics.median(m.messages_per_s for m in runs),
        consumer_rss_peak_bytes=max(m.rss_peak for m in runs),
    )
