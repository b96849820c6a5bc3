"""The benchmark's message checks: a figure is only worth printing if a lost,
repeated, reordered, truncated or damaged message fails the run.

``receive_checked`` is the consumer's loop; here it reads from a list
instead of a transport, so each kind of fault can be put in on purpose.
"""

import pytest

from bigipc import _bench


def _case(size, producers=1, slots=4):
    return _bench.BytesCase(
        "t-%d-%d" % (size, producers), "test", size, 100, 10, max_slots=slots, producers=producers
    )


def _stream(case, count, start=0, producer=0):
    """The first ``count`` messages one producer sends, from message ``start``."""
    return [case.build_message(producer, i % case.slots) for i in range(start, start + count)]


def _receive(checker, messages, count=None):
    source = iter(messages)
    problem = _bench.receive_checked(source.__next__, checker, len(messages) if count is None else count)
    return problem, list(source)


# 100 B takes the comparison fast path; 8 KiB the sampled check; 100 B from
# two producers the general path for small messages.
SHAPES = [
    pytest.param(100, 1, id="small"),
    pytest.param(8192, 1, id="large"),
    pytest.param(100, 2, id="two-producers"),
]


def _interleaved(case, count, start=0):
    """``count`` messages from every producer, alternating."""
    streams = [_stream(case, count, start, producer) for producer in range(case.producers)]
    return [message for group in zip(*streams) for message in group]


@pytest.mark.parametrize("size, producers", SHAPES)
def test_right_messages_pass_across_batches(size, producers):
    case = _case(size, producers)
    checker = case.checker()
    # Several batches, running past the end of the slots more than once:
    # each batch must start where the last one stopped.
    for batch in range(4):
        messages = _interleaved(case, 3, start=3 * batch)
        assert _receive(checker, messages) == (None, [])
    assert checker.received == 4 * 3 * producers


@pytest.mark.parametrize("size, producers", SHAPES)
@pytest.mark.parametrize(
    "fault, expected",
    [
        ("lost", "out of order"),
        ("repeated", "out of order"),
        ("swapped", "out of order"),
        ("truncated", "length"),
        ("damaged", "differ"),
    ],
)
def test_each_fault_fails_the_run(size, producers, fault, expected):
    case = _case(size, producers)
    checker = case.checker()
    messages = _interleaved(case, 6)
    bad = 2 * producers  # the first message of producer 0's third
    if fault == "lost":
        del messages[bad]
    elif fault == "repeated":
        messages.insert(bad, messages[bad - producers])
    elif fault == "swapped":
        messages[bad], messages[bad + producers] = messages[bad + producers], messages[bad]
    elif fault == "truncated":
        messages[bad] = messages[bad][:-1]
    else:
        damaged = bytearray(messages[bad])
        # Past the 16 bytes that name the message, inside the window and
        # tail a large message's check always looks at.
        damaged[-1] ^= 0xFF
        messages[bad] = bytes(damaged)
    count = len(messages)
    problem, left = _receive(checker, messages, count)
    assert problem is not None
    # A lost message shows at its producer's next one; with two producers
    # the other one's message comes in between.
    number = bad + producers if fault == "lost" else bad + 1
    assert problem.startswith("message #%d: " % number), problem
    assert expected in problem or (fault == "damaged" and "last 16 bytes" in problem), problem
    # The rest of the batch was still taken, so a producer is never left
    # blocked on a full transport.
    assert left == []


def test_a_wrong_message_at_the_end_of_a_batch_is_caught():
    case = _case(100)
    checker = case.checker()
    messages = _stream(case, 5)
    messages[-1] = messages[1]
    assert _receive(checker, messages)[0].startswith("message #5: ")


def test_the_fast_path_counts_like_the_general_one():
    case = _case(100)
    fast, general = case.checker(), case.checker()
    messages = _stream(case, 7)
    assert _receive(fast, messages)[0] is None
    for message in messages:
        assert general.check(message) is None
    assert (fast.received, fast._next) == (general.received, general._next) == (7, [7])
