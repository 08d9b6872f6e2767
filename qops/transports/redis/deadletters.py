"""Dead letters: ``qops.dlq`` (hash id -> JSON record) and ``qops.dlq.index`` (zset of
ids by time); storing, listing, requeueing (back to the list of the message's priority
step) and purging them. ``RedisConsumer.reject`` stores with ``dlq_record`` too, in one
script with the settlement."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from qops.transports.base import DeadLetter
from qops.transports.redis.names import list_name, raw_step

if TYPE_CHECKING:
    from qops.transports.redis.transport import RedisTransport

log = logging.getLogger(__name__)


def dlq_record(queue: str, raw: bytes, reason: str) -> tuple[str, str, float]:
    dl_id, now = uuid.uuid4().hex, time.time()
    record = json.dumps({"id": dl_id, "queue": queue, "reason": reason,
                         "raw": base64.b64encode(raw).decode("ascii"), "time": now})
    return dl_id, record, now


def dead_letter(t: RedisTransport, queue: str, raw: bytes, reason: str) -> None:
    dl_id, record, now = dlq_record(queue, raw, reason)
    pipe = t._client.pipeline(transaction=True)
    pipe.hset(t.key("qops.dlq"), dl_id, record)
    pipe.zadd(t.key("qops.dlq.index"), {dl_id: now})
    with t.guard("storing a dead letter"):
        pipe.execute()


def _dead_records(t: RedisTransport, ids: Sequence[str]) -> list[DeadLetter]:
    if not ids:
        return []
    raws = cast("list[bytes | None]", t._client.hmget(t.key("qops.dlq"), list(ids)))
    out = []
    for dl_id, rec in zip(ids, raws, strict=True):
        if rec is None:
            continue
        try:
            d = json.loads(rec)
            out.append(DeadLetter(str(d["id"]), str(d["queue"]), str(d["reason"]),
                                  base64.b64decode(d["raw"]), float(d["time"])))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipping unreadable dead-letter record %s: %s", dl_id, exc)
    return out


def _dlq_ids(t: RedisTransport, last: int) -> list[str]:
    """Dead-letter ids, oldest first, up to index ``last`` (-1 = all)."""
    ids = cast("list[bytes]", t._client.zrange(t.key("qops.dlq.index"), 0, last))
    return [i.decode() for i in ids]


def dead_letters(t: RedisTransport, limit: int = 100) -> list[DeadLetter]:
    if limit <= 0:
        return []
    with t.guard("listing dead letters"):
        ids = _dlq_ids(t, limit - 1)
        return _dead_records(t, ids)


def dead_letter_count(t: RedisTransport) -> int:
    with t.guard("counting dead letters"):
        return int(t._client.hlen(t.key("qops.dlq")))


def requeue_dead_letters(t: RedisTransport, ids: Sequence[str] | None = None) -> int:
    with t.guard("requeueing dead letters"):
        if ids is None:
            ids = _dlq_ids(t, -1)
        done = 0
        for start in range(0, len(ids), 500):
            for dl in _dead_records(t, ids[start: start + 500]):
                if not dl.queue:
                    log.warning("dead letter %s has no queue to go back to; kept", dl.id)
                    continue
                step = raw_step(dl.raw)
                t.bind([dl.queue])
                keys = [t.key("qops.dlq"), t.key("qops.dlq.index"),
                        t.key(list_name(dl.queue, step))]
                done += int(t._lua_dlq_requeue(keys=keys, args=[dl.id, dl.raw]))
        return done


def purge_dead_letters(t: RedisTransport) -> int:
    pipe = t._client.pipeline(transaction=True)
    pipe.hlen(t.key("qops.dlq"))
    pipe.delete(t.key("qops.dlq"), t.key("qops.dlq.index"))
    with t.guard("purging dead letters"):
        return int(pipe.execute()[0])
