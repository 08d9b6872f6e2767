"""What a script can count on: one-line errors on stderr, the documented exit codes,
and with --json exactly one JSON document on stdout, on success and on error."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, WorkerProcess, qops_env, run_qops


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_redis_db_that_is_not_a_number_purges_nothing(redis_url: str) -> None:
    import redis

    db = redis_url.rsplit("/", 1)[1]
    client = redis.Redis.from_url(redis_url)
    # a queue no worker consumes (a worker left from another test could take from 'qops')
    client.lpush("cli-guard", b"keep me")
    client.sadd("_kombu.binding.cli-guard", "cli-guard\x06\x16\x06\x16cli-guard")
    # redis-py reads the path 'x' as no db: the query's db, or db 0, would be purged
    r = run_qops("-b", f"{redis_url.rsplit('/', 1)[0]}/x?db={db}", "purge", "-f")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "the db 'x' is not a number" in line and "redis://" in line
    assert client.llen("cli-guard") == 1
    client.close()


def test_an_empty_or_misspelt_name_purges_nothing(redis_url: str) -> None:
    """An unset variable (-Q "$QUEUES", -d "$NODE") is not "every queue" or "every node",
    and a misspelt -X does not leave the queue it meant unprotected."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.lpush("cli-keep", b"keep me")
    client.sadd("_kombu.binding.cli-keep", "cli-keep\x06\x16\x06\x16cli-keep")
    for args, code, says in [
            (["purge", "-f", "-Q", ""], 2, "-Q/--queues: an empty name in ''"),
            (["purge", "-f", "-Q", " , "], 2, "an empty name"),
            (["purge", "-f", "-Q", "cli-keep,,other"], 2, "an empty name"),
            (["purge", "-f", "-X", ""], 2, "-X/--exclude-queues: an empty name"),
            (["purge", "-f", "-X", "cli-kep"], 1, "no such queue to exclude: cli-kep"),
            (["control", "shutdown", "-d", ""], 2, "-d/--destination: an empty name"),
            (["control", "shutdown", "--pattern", ""], 2, "--pattern: empty"),
            (["status", "-d", ","], 2, "an empty name"),
            (["control", "rate_limit", "proj.tasks.add", ""], 2, "an empty argument"),
            (["control", "revoke", " "], 2, "an empty argument")]:
        r = run_qops("-b", redis_url, *args)
        assert r.returncode == code and says in one_error_line(r.stderr), (args, r.stderr)
        r = run_qops("-b", redis_url, "--json", *args)
        assert r.returncode == code and json.loads(r.stdout)["exit_code"] == code, args
    assert client.llen("cli-keep") == 1
    r = run_qops("-b", redis_url, "control", "rate_limit", "proj.tasks.add", "-1/m")
    assert r.returncode == 2 and "put -- before the arguments" in r.stderr
    client.delete("cli-keep", "_kombu.binding.cli-keep")
    client.close()


def test_no_sentinel_answering_is_one_short_line() -> None:
    r = run_qops("-b", "sentinel://127.0.0.1:1;sentinel://127.0.0.1:2/0?master_name=m",
                 "status")
    line = one_error_line(r.stderr)
    assert r.returncode == 74 and "127.0.0.1:1 - " in line and "127.0.0.1:2 - " in line
    assert "redis.client" not in line and len(line) < 500, line


def test_call_wait_checks_the_result_backend_before_sending(redis_url: str) -> None:
    """A script that tries again after "unreachable" must not run the task twice."""
    import redis

    queue = f"cli-wait-{os.getpid()}"
    r = run_qops("-A", "proj", "-b", redis_url, "call", "proj.tasks.add", "--args", "[1, 2]",
                 "--queue", queue, "--wait", "--result-backend", "redis://127.0.0.1:1/0")
    assert r.returncode == 74 and "result backend" in one_error_line(r.stderr)
    assert "Connection refused;" in r.stderr  # one stop, then the hint
    client = redis.Redis.from_url(redis_url)
    assert client.llen(queue) == 0  # not sent
    client.close()


def test_a_node_that_cannot_start_says_why_once(tmp_path: Path, sqlite_url: str) -> None:
    """Foreground worker and beat, multi: a file they cannot open or a bad option is one
    line and a usage error, never a traceback nor "unexpected"; an unreachable broker
    is said once (not a log record and then the same as qops: error:)."""
    a_file = tmp_path / "file"
    a_file.write_text("")
    for args, code, says in [
            (["worker", "--logfile", str(tmp_path)], 2, "cannot open log file"),
            (["beat", "--logfile", str(tmp_path), "-s", str(tmp_path / "s")], 2,
             "cannot open log file"),
            (["worker", "--pidfile", f"{a_file}/w.pid"], 2, "cannot read pidfile"),
            (["worker", "-b", "redis://127.0.0.1:1/0"], 74, "unreachable"),
            (["multi", "stopwait", "w1", "--timeout", "abc"], 2, "--timeout must be a number"),
            (["multi", "restart", "w1", "--timeout", "-1"], 2, "greater than 0"),
            (["multi", "start", "w1", "--pidfile", f"{a_file}/%n.pid"], 2, "cannot read pid"),
            (["worker", "--logfile", ""], 2, "--logfile: an empty file name"),
            (["worker", "-S", " "], 2, "an empty file name"),
            (["beat", "-s", ""], 2, "the schedule file (-s): an empty file name")]:
        r = run_qops("-A", "proj", "-b", sqlite_url, *args, timeout=60)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert says in one_error_line(r.stderr), (args, r.stderr)
        assert "unexpected" not in r.stderr
        if args[0] == "worker":  # --check finds it too, and leaves no file
            r = run_qops("-A", "proj", "-b", sqlite_url, *args, "--check", timeout=60)
            assert r.returncode == code and says in one_error_line(r.stderr), (args, r.stderr)
    r = run_qops("-A", "proj", "-b", sqlite_url, "worker", "--check", "--logfile",
                 str(tmp_path / "new" / "w.log"))
    assert r.returncode == 0 and not (tmp_path / "new").exists(), r.stderr
    r = run_qops("multi", "stop", "w9", "--rundir", str(tmp_path))
    assert r.returncode == 0 and "never started here" in r.stdout, r.stdout


def test_an_out_of_range_redis_db_is_one_line(redis_url: str) -> None:
    r = run_qops("-b", redis_url.rsplit("/", 1)[0] + "/9999", "queues")
    assert r.returncode == 2
    assert "db 9999 is out of range" in one_error_line(r.stderr)


@pytest.mark.parametrize(("url", "says"), [
    ("redis://localhost:6379/db0", "expected redis://"),
    ("sqlite://relative.db", "expected sqlite:///"),
    ("rabbitmq://localhost", "did you mean amqp://"),
    ("", "the broker URL is empty"),
])
def test_tutorial_url_mistakes_are_usage_errors(url: str, says: str) -> None:
    r = run_qops("-b", url, "purge", "-f")
    assert r.returncode == 2 and says in one_error_line(r.stderr)


def test_sqlite_missing_directory_is_named_not_created(tmp_path: Path) -> None:
    r = run_qops("-b", f"sqlite://{tmp_path}/missing/dir/x.db", "queues")
    assert r.returncode == 2
    assert f"directory {tmp_path}/missing does not exist" in one_error_line(r.stderr)
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run qops as nobody")
def test_read_only_sqlite_names_the_path(tmp_path: Path) -> None:
    from tests.reachable import make_folder, reachable_python

    folder = make_folder("qops-pylib-")
    try:
        found = reachable_python("nobody", folder)
        if isinstance(found, str):
            pytest.skip(found)
        shared = make_folder("qops-ro-")
        db = shared / "b.db"
        assert run_qops("-b", f"sqlite://{db}", "queues").returncode == 0
        os.chmod(shared, 0o555)
        for f in shared.iterdir():
            os.chmod(f, 0o444)
        env = found.env({"PATH": "/usr/bin:/bin", "HOME": str(shared)})

        def drop() -> None:
            os.setgid(65534)
            os.setuid(65534)

        r = subprocess.run([found.python, "-m", "qops", "-b", f"sqlite://{db}", "purge", "-f"],
                           env=env, capture_output=True, text=True, cwd=str(shared),
                           preexec_fn=drop, timeout=60)
        assert r.returncode == 74
        line = one_error_line(r.stderr)
        assert str(db) in line and "read-only" in line
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        if "shared" in locals():
            shutil.rmtree(shared, ignore_errors=True)


def test_json_errors_are_one_document_on_stdout() -> None:
    cases = [
        (["--json", "no-such-command"], 2),
        (["--json", "call"], 2),  # missing argument
        (["--json", "-b", "redis://localhost/db0", "queues"], 2),
        (["-b", "redis://127.0.0.1:1/0", "queues", "--json"], 74),
        (["--json", "call", "t", "--args", "[1,"], 2),
    ]
    for args, code in cases:
        r = run_qops(*args)
        assert r.returncode == code, (args, r.stderr)
        doc = json.loads(r.stdout)
        assert doc["exit_code"] == code and doc["error"], args
        assert r.stderr.strip(), args  # the human line is still on stderr


def test_json_version_is_a_document() -> None:
    r = run_qops("--json", "--version")
    assert r.returncode == 0 and "version" in json.loads(r.stdout)


def test_no_nodes_replied_goes_to_stderr(sqlite_url: str) -> None:
    r = run_qops("-b", sqlite_url, "status", "--timeout", "0.3")
    assert r.returncode == 69 and r.stdout.strip() == ""
    assert "no nodes replied" in r.stderr
    r = run_qops("-b", sqlite_url, "--json", "status", "--timeout", "0.3")
    assert r.returncode == 69 and json.loads(r.stdout)["nodes"] == {}
    assert "no nodes replied" in r.stderr


def test_non_utf8_argument_is_one_line() -> None:
    r = run_qops("-b", "memory://", "call", os.fsdecode(b"\xff"))
    assert r.returncode == 2
    assert "not valid UTF-8" in one_error_line(r.stderr)


def on_a_terminal(args: list[str], answer: bytes, stdout: Path | None = None
                  ) -> tuple[int, bytes]:
    """Run qops on a pseudo-terminal (its stdout to ``stdout`` if given), answer its
    ``[y/N]`` prompt; (exit code, what the terminal showed). Killed after 30 s: a prompt
    that never shows on the terminal fails the test, not hangs it."""
    import select
    import signal
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: qops on a terminal
        os.chdir(ROOT)
        if stdout is not None:
            os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.execve(sys.executable, [sys.executable, "-m", "qops", *args], qops_env())
    seen, answered, deadline = b"", False, time.monotonic() + 30
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.5)[0]:
            continue
        try:
            data = os.read(fd, 1024)
        except OSError:
            break
        if not data:
            break
        seen += data
        if not answered and b"[y/N]" in seen:
            os.write(fd, answer + b"\n")
            answered = True
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert answered, seen
    return os.waitstatus_to_exitcode(status), seen


def test_declining_the_purge_prompt_says_nothing_was_purged(sqlite_url: str) -> None:
    code, seen = on_a_terminal(["-b", sqlite_url, "purge"], b"n")
    assert code == 1 and b"nothing was purged" in seen


def test_the_purge_prompt_goes_to_stderr_under_json(sqlite_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out.json"  # a script's file
    code, _ = on_a_terminal(["-b", sqlite_url, "--json", "purge"], b"y", stdout=out)
    assert code == 0
    assert json.loads(out.read_text())["dry_run"] is False  # the prompt is not in it


def test_call_args_from_a_file_and_stdin(tmp_path: Path, sqlite_url: str) -> None:
    (tmp_path / "args.json").write_text("[2, 3]")
    (tmp_path / "bad.json").write_text('{"x":\n 1,}')
    g = ["-A", "proj", "-b", sqlite_url]
    r = run_qops(*g, "call", "proj.tasks.add", "--args", f"@{tmp_path}/args.json")
    assert r.returncode == 0, r.stderr
    r = run_qops(*g, "call", "proj.tasks.mul", "--kwargs", "-", input='{"x": 3, "y": 5}')
    assert r.returncode == 0, r.stderr
    r = run_qops(*g, "call", "proj.tasks.mul", "--kwargs", f"@{tmp_path}/bad.json")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"--kwargs @{tmp_path}/bad.json is not valid JSON" in line and "line 2" in line
    r = run_qops(*g, "call", "proj.tasks.add", "--args", f"@{tmp_path}/nope.json")
    assert r.returncode == 2 and "nope.json" in one_error_line(r.stderr)
    with WorkerProcess("-P", "solo", broker=sqlite_url, logfile=tmp_path / "w.log"):
        r = run_qops(*g, "call", "proj.tasks.add", "--args", "-", "--wait", "--timeout", "20",
                     input="[20, 22]")
        assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr


def test_worker_log_cuts_a_large_result(tmp_path: Path, sqlite_url: str) -> None:
    g = ["-A", "proj", "-b", sqlite_url]
    log = tmp_path / "w.log"
    with WorkerProcess("-P", "solo", "-l", "info", broker=sqlite_url, logfile=log):
        r = run_qops(*g, "call", "proj.tasks.mul", "--kwargs", '{"x": "ab", "y": 1000000}',
                     "--wait", "--timeout", "30", "--json")
        assert r.returncode == 0, r.stderr
    text = log.read_text()
    assert re.search(r"succeeded in .*: 'abab.*\.\.\.$", text, re.M), text[-2000:]
    assert max(len(line) for line in text.splitlines()) < 1500
