from __future__ import annotations

import base64
import datetime as dt
import json
import uuid

import pytest

from qops import protocol
from qops.errors import NotRegistered, ProtocolError
from qops.protocol import Message, decode_envelope, encode_envelope


def test_build_has_every_v2_header() -> None:
    m = protocol.build_task_message("proj.add", [2, 2], {"z": 1}, time_limit=10,
                                    soft_time_limit=5, priority=7)
    h = m.headers
    for key in ("lang", "task", "id", "shadow", "eta", "expires", "group", "group_index",
                "retries", "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr",
                "origin", "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps"):
        assert key in h
    assert h["task"] == "proj.add" and h["lang"] == "py"
    assert h["timelimit"] == [10, 5]  # hard first
    assert h["root_id"] == h["id"]
    assert m.properties["correlation_id"] == h["id"]
    assert m.properties["priority"] == 7
    args, kwargs, embed = json.loads(m.body)
    assert args == [2, 2] and kwargs == {"z": 1}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_parse_round_trip_with_eta() -> None:
    eta = dt.datetime(2030, 1, 1, 12, tzinfo=dt.timezone.utc)
    m = protocol.build_task_message("t", [1], {}, eta=eta, retries=2)
    req = protocol.parse_task_message(m)
    assert req.name == "t" and req.args == [1] and req.retries == 2
    assert req.eta == eta


@pytest.mark.parametrize("message,reason", [
    (Message(body=b"{}", headers={}), "protocol v1"),
    (Message(body=b"[[1], {}", headers={"task": "t", "id": "1"}), "not valid JSON"),
    (Message(body=b'{"a": 1}', headers={"task": "t", "id": "1"}), "[args, kwargs, embed]"),
    (Message(body=b'[1, {}, {}]', headers={"task": "t", "id": "1"}), "args is not a list"),
    (Message(body=b'[[], [], {}]', headers={"task": "t", "id": "1"}), "kwargs is not"),
    (Message(body=b"[[], {}, {}]", headers={"task": "t", "id": "1"},
             content_type="application/x-python-serialize"), "JSON only"),
])
def test_parse_rejects_with_reason(message: Message, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        protocol.parse_task_message(message)


def test_type_tags() -> None:
    value = [dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), dt.date(2026, 1, 2),
             uuid.UUID(int=5), b"\xff"]
    text = protocol.dumps(value)
    assert '"__type__":"datetime"' in text and '"__type__":"bytes"' in text
    assert protocol.loads(text) == value


def test_exceptions_round_trip() -> None:
    exc = protocol.dict_to_exception(protocol.exception_to_dict(KeyError("k")))
    assert type(exc) is KeyError and exc.args == ("k",)
    nr = protocol.dict_to_exception(protocol.exception_to_dict(NotRegistered("x")))
    assert isinstance(nr, NotRegistered)
    unknown = protocol.dict_to_exception({"exc_type": "WeirdError", "exc_module": "nowhere.mod",
                                          "exc_message": ["m"]})
    assert type(unknown).__name__ == "WeirdError" and unknown.args == ("m",)


def test_envelope_is_kombu_shaped() -> None:
    m = protocol.build_task_message("t", [1], {})
    env = json.loads(encode_envelope("q1", m))
    assert env["properties"]["body_encoding"] == "base64"
    assert env["properties"]["delivery_info"] == {"exchange": "", "routing_key": "q1"}
    assert env["properties"]["delivery_tag"]
    assert base64.b64decode(env["body"]) == m.body
    assert env["content-type"] == "application/json"
    back = decode_envelope(json.dumps(env))
    assert back.body == m.body and back.headers == m.headers


def test_envelope_accepts_raw_utf8_body() -> None:
    env = {"body": "[[1], {}, {}]", "headers": {"task": "t"}, "properties": {}}
    assert decode_envelope(json.dumps(env)).body == b"[[1], {}, {}]"


@pytest.mark.parametrize("raw,reason", [
    (b"not json", "invalid JSON"),
    (b'{"body": "!!!", "properties": {"body_encoding": "base64"}}', "invalid base64"),
    (b"[1, 2]", "not an object"),
])
def test_envelope_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_envelope(raw)


def test_new_id_is_a_version_4_uuid_string() -> None:
    import uuid

    from qops.ids import new_id

    ids = {new_id() for _ in range(500)}
    assert len(ids) == 500
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_new_id_pool_is_not_shared_with_a_forked_child() -> None:
    import os

    from qops.ids import new_id

    new_id()  # a pool is made: the child must not hand out its ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, " ".join(new_id() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = set(f.read().split())
    os.waitpid(pid, 0)
    mine = {new_id() for _ in range(300)}
    assert len(child) == 300 and not child & mine


def test_one_build_path_a_batch_is_messages_built_one_at_a_time() -> None:
    from qops.protocol import TaskMessages

    eta = dt.datetime(2030, 1, 1, 12, tzinfo=dt.timezone.utc)
    options = {"eta": eta, "time_limit": 9, "group": "g", "priority": 3, "reply_to": "r",
               "callbacks": [{"task": "cb"}]}
    batch = TaskMessages("t", **options)
    built = [batch.build([i], {"k": i}) for i in range(3)]
    for i, m in enumerate(built):
        alone = protocol.build_task_message("t", (i,), {"k": i}, task_id=m.headers["id"],
                                            **options)
        assert (m.body, m.headers, m.properties) == (alone.body, alone.headers,
                                                     alone.properties)
        assert list(m.headers) == list(alone.headers)  # the wire order too
    # each message has its own mutable headers
    built[0].headers["timelimit"].append(1)
    built[0].headers["stamps"]["x"] = 1
    assert built[1].headers["timelimit"] == [9, None] and built[1].headers["stamps"] == {}
    assert len({m.headers["id"] for m in built}) == 3


def test_json_writers_match_the_stdlib_encoder() -> None:
    values = [[1, 2.5, float("nan"), "é\n", {"a": None, "b": [True, False]}], "s", 3, None,
              {"when": dt.datetime(2030, 1, 1), "raw": b"\x00", "set": (1, 2)}]
    stdlib = json.JSONEncoder(default=protocol._default, separators=(",", ":"))
    for value in values:
        assert protocol.dumps(value) == stdlib.encode(value)
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        protocol.dumps(loop)
    with pytest.raises(TypeError, match="not JSON serializable"):
        protocol.dumps(object())
