"""The prefetch books every consumer keeps, and the one place raw bytes become a Delivery."""

from __future__ import annotations

import threading
import time

from qops.protocol import Message, decode_envelope, encode_envelope
from qops.transports.base import MAX_REASON, make_delivery
from qops.transports.prefetch import Prefetch


def test_room_counts_held_minus_exempt_and_pending() -> None:
    books: Prefetch[str] = Prefetch(3)
    assert books.room() == 3
    books.hold(10, "q")
    books.hold(11, "q")
    assert books.room() == 1 and books.room(pending=1) == 0 and books.room(pending=5) == 0
    assert books.exempt(10) and not books.exempt(10) and not books.exempt(99)
    assert books.room() == 2
    assert books.settle(10) == "q" and books.settle(10) is None
    assert books.exempted == set() and books.room() == 2
    assert books.peek(11) == "q"
    assert books.clear() == {11: "q"} and books.room() == 3


def test_take_makes_sequence_tags() -> None:
    books: Prefetch[tuple[str, bytes]] = Prefetch(0)  # a prefetch below 1 is 1
    assert books.limit == 1
    with books.cond:
        assert books.take_locked(("q", b"a")) == 1
        assert books.take_locked(("q", b"b")) == 2
        assert books.room_locked() == 0
        assert list(books.held) == [1, 2]


def test_a_settlement_from_another_thread_ends_the_wait() -> None:
    books: Prefetch[str] = Prefetch(1)
    books.hold("t", "q")
    assert not books.wait_for_room(0.05)
    threading.Timer(0.1, books.settle, ("t",)).start()
    start = time.monotonic()
    assert books.wait_for_room(5)
    assert time.monotonic() - start < 2
    books.hold("u", "q")
    threading.Timer(0.1, books.exempt, ("u",)).start()
    assert books.wait_for_room(5)
    assert not books.wait_for_room(0.05, pending=lambda: 1)


def test_wait_for_room_can_want_several_slots() -> None:
    books: Prefetch[str] = Prefetch(4)
    for tag in "abcd":
        books.hold(tag, "q")
    books.settle("a")
    assert books.wait_for_room(0.01) and not books.wait_for_room(0.05, want=2)
    threading.Timer(0.1, books.exempt, ("b",)).start()
    start = time.monotonic()
    with books.cond:  # the locked form, for a consumer that holds ``cond`` already
        assert books.wait_for_room_locked(5, want=2)
    assert time.monotonic() - start < 2


def test_a_waiter_wakes_once_its_room_is_there_not_at_every_settlement() -> None:
    """A consumer waiting for 3 free slots is woken by the settlement that frees the
    third, not by the two before it (each wake is a thread switch)."""
    books: Prefetch[str] = Prefetch(4)
    for tag in "abcd":
        books.hold(tag, "q")
    wakes = 0
    ready = threading.Event()

    def wait() -> None:
        nonlocal wakes
        with books.cond:
            ready.set()
            while books.room_locked() < 3:
                books.wait_locked(5, want=3)
                wakes += 1

    waiter = threading.Thread(target=wait)
    waiter.start()
    ready.wait(5)
    woke = []
    for tag in "abc":
        time.sleep(0.05)
        with books.cond:  # the settler learns which of its settlements woke the waiter
            books.settle_locked(tag)
            woke.append(books.woke_locked())
    waiter.join(5)
    assert not waiter.is_alive() and wakes == 1
    assert woke == [False, False, True]
    with books.cond:
        assert not books.woke_locked()  # told once
    with books.cond:  # nobody waits: settlements notify nobody
        assert books._wake_at > books.limit


def test_make_delivery_catches_anything_the_decoder_raises() -> None:
    raw = encode_envelope("q", Message(body=b"[[], {}, {}]", headers={"task": "t"}))
    good = make_delivery("q", 7, raw, decode_envelope, redelivered=True)
    assert good.error is None and good.message is not None and good.redelivered
    assert good.message.headers == {"task": "t"} and good.tag == 7

    bad = make_delivery("q", 1, b"{nope", decode_envelope)
    assert bad.message is None and bad.error is not None
    assert bad.error.startswith("invalid JSON envelope")  # a decoder's own reason, as is

    deep = make_delivery("q", 2, b"[" * 200_000 + b"]" * 200_000, decode_envelope)
    assert deep.message is None and deep.error is not None
    assert deep.error.startswith("undecodable message (RecursionError): ")

    def boom(raw: bytes) -> Message:
        raise KeyError("x\ny" * 1000)

    long = make_delivery("q", 3, b"", boom)
    assert long.error is not None and "\n" not in long.error
    assert len(long.error) == MAX_REASON and long.error.endswith("...")


def test_hold_if_room_holds_only_while_there_is_room() -> None:
    books: Prefetch[str] = Prefetch(2)
    with books.cond:
        assert books.hold_if_room_locked(1, "a") and books.hold_if_room_locked(2, "b")
        assert not books.hold_if_room_locked(3, "c") and 3 not in books.held
        assert books.exempt_locked(1)
        assert books.hold_if_room_locked(3, "c") and books.room_locked() == 0
        assert list(books.held) == [1, 2, 3]
