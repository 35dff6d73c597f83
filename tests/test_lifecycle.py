"""Start, reload and stop: socket ownership, SIGHUP, SIGTERM, systemd-style notify, CLI."""
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from clirun import cli, cli_argv, cli_env
from conftest import wait_for
from rawsock import Raw
from sidecar import Client
from sidecar.wire import Pong


def test_default_socket_mode_and_clean_exit(daemon):
    assert stat.S_IMODE(os.stat(daemon.path).st_mode) == 0o660
    assert daemon.stop() == 0
    assert not daemon.path.exists()
    assert "stopped" in daemon.log()


def test_configured_socket_mode(start_daemon):
    d = start_daemon('[server]\nsocket_mode = "0600"\n')
    assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o600


def test_stale_socket_is_replaced(tmp_path, start_daemon):
    path = tmp_path / "llm.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on, as a crashed daemon leaves it
    d = start_daemon(socket_path=path)
    assert "removing stale socket" in d.log()
    with Client(path) as c:
        assert c.ping() > 0


def test_live_socket_is_refused(daemon, start_daemon):
    second = start_daemon(socket_path=daemon.path, wait=False)
    assert second.proc.wait(30) == 2
    assert f"pid {daemon.pid}" in second.log() and str(daemon.path) in second.log()
    with Client(daemon.path) as c:  # the first one is untouched
        assert c.stats().pid == daemon.pid


def test_live_socket_without_lock_is_refused(tmp_path, start_daemon):
    # Another program answers on the path (no lock file of ours): probe, then refuse.
    path = tmp_path / "other.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    try:
        d = start_daemon(socket_path=path, wait=False)
        assert d.proc.wait(30) == 2
        assert "live daemon already answers" in d.log()
        assert path.exists()
    finally:
        srv.close()


def test_non_socket_file_is_refused(tmp_path, start_daemon):
    path = tmp_path / "file.sock"
    path.write_text("not a socket")
    d = start_daemon(socket_path=path, wait=False)
    assert d.proc.wait(30) == 2
    assert "not a socket" in d.log()
    assert path.read_text() == "not a socket"


def test_private_directory_is_created_0700_and_checked(tmp_path, start_daemon):
    private = tmp_path / f"llm-sidecar-{os.getuid()}"
    d = start_daemon(socket_path=private / "llm.sock")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    assert d.stop() == 0
    os.chmod(private, 0o777)
    d = start_daemon(socket_path=private / "llm.sock", wait=False)
    assert d.proc.wait(30) == 2
    assert "mode 0700" in d.log()


def test_relative_socket_is_refused_like_in_config(tmp_path):
    # --socket obeys config's rule for server.socket: the same message, nothing bound
    def serve(*args, env=None):
        return subprocess.run(cli_argv("serve", *args), capture_output=True, text=True,
                              env=cli_env(env), timeout=30, cwd=tmp_path)

    flag = serve("--socket", "rel.sock")
    variable = serve(env={"LLM_SIDECAR_SOCKET": "rel.sock"})
    for r, source in ((flag, "--socket"), (variable, "LLM_SIDECAR_SOCKET")):
        assert r.returncode == 2, r.stderr
        assert f"{source}: server.socket: socket path 'rel.sock' is not absolute" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_lock_file_is_removed_on_sigterm_if_still_ours(start_daemon):
    d = start_daemon()
    lock = d.path.with_name(d.path.name + ".lock")
    assert lock.read_text() == f"{d.pid}\n"
    assert d.stop() == 0
    assert not lock.exists()
    # Replaced while the daemon ran (an operator, another daemon): not ours to remove.
    d = start_daemon()
    lock.unlink()
    lock.write_text("someone else's\n")
    assert d.stop() == 0
    assert lock.read_text() == "someone else's\n"


def test_socket_from_environment(tmp_path, start_daemon):
    # No --socket: daemon and CLI both find the path in LLM_SIDECAR_SOCKET.
    path = tmp_path / "env.sock"
    d = start_daemon(socket_path=path, env={"LLM_SIDECAR_SOCKET": str(path)},
                     pass_socket=False)
    r = cli("ping", env={"LLM_SIDECAR_SOCKET": str(path)})
    assert r.returncode == 0 and r.stdout.strip().endswith("us")
    assert d.stop() == 0


def test_sighup_with_broken_config_keeps_the_old_one(start_daemon):
    d = start_daemon('[normalize]\nfiller_words = ["please"]\n')
    with Client(d.path) as c:
        assert c.fingerprint("please go").normalized == "go"
        d.config.write_text('[normalize]\nfiller_words = "not a list\n')
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: "reload failed" in d.log())
        assert c.fingerprint("please go").normalized == "go"
        assert c.stats().config_epoch == 0
        d.config.write_text('[normalize]\nfiller_words = ["go"]\n')
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: c.stats().config_epoch == 1)
        assert c.fingerprint("please go").normalized == "please"
        d.config.write_text('[server]\nmax_frame_bytes = 10\n')  # invalid value
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: d.log().count("reload failed") == 2)
        assert c.hello().max_frame == 4 * 1024 * 1024
        assert c.stats().config_epoch == 1
    assert d.stop() == 0


def test_sigterm_answers_requests_in_flight(daemon):
    # Freeze the daemon, queue requests it has not read yet, ask it to stop, let it run:
    # every queued request is answered before the connection closes and the process exits.
    # The backlog is made larger than one read of the daemon's where the kernel allows
    # (root may raise the buffer), so the drain must look past what it has already read.
    idle = Raw(daemon.path)
    with Raw(daemon.path) as r:
        try:
            r.sock.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE
        except OSError:
            r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        room = r.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        n = max(1000, min(200_000, room // 4 // 20))
        r.send({"op": "ping", "id": 0})
        assert r.recv() == Pong(id=0)
        daemon.signal(signal.SIGSTOP)
        body = b"".join(
            len(b).to_bytes(4, "big") + b
            for b in (msgspec.msgpack.encode({"op": "ping", "id": i}) for i in range(1, n + 1)))
        r.send_bytes(body)
        daemon.signal(signal.SIGTERM)
        daemon.signal(signal.SIGCONT)
        got = []
        while (reply := r.recv()) is not None:
            got.append(reply.id)
    idle.sock.close()
    assert got == list(range(1, n + 1))
    assert daemon.proc.wait(30) == 0
    assert not daemon.path.exists()
    with pytest.raises(OSError):
        Raw(daemon.path)


def test_sd_notify_ready_and_stopping(tmp_path, start_daemon):
    notify_path = tmp_path / "notify"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(notify_path))
    sink.settimeout(15)
    try:
        d = start_daemon(env={"NOTIFY_SOCKET": str(notify_path)})
        assert sink.recv(4096).startswith(b"READY=1")
        assert d.stop() == 0
        assert sink.recv(4096) == b"STOPPING=1"
    finally:
        sink.close()


def test_cli_against_a_daemon(daemon):
    sock = str(daemon.path)
    r = cli("ping", "--socket", sock, "-n", "3")
    assert r.returncode == 0
    assert len([line for line in r.stdout.splitlines() if line.endswith(" us")]) == 3
    r = cli("fingerprint", "--socket", sock, "--json", "Could you just say hi?")
    data = json.loads(r.stdout)
    assert data["normalized"] == "say hi" and len(data["key"]) == 32
    r = cli("stats", "--socket", sock)
    assert r.returncode == 0
    assert "p50 us" in r.stdout and "fingerprint" in r.stdout and "native tokens" in r.stdout
    r = cli("stats", "--socket", sock, "--json")
    stats = json.loads(r.stdout)
    assert stats["ops"]["ping"]["requests"] == 3 and stats["pid"] == daemon.pid


def test_cli_unreachable_exits_1(tmp_path):
    r = cli("ping", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    assert "llm-sidecar serve" in r.stderr
    assert cli("stats", "--socket", str(tmp_path / "none.sock")).returncode == 1


def test_json_logs(start_daemon):
    d = start_daemon(args=("--log-format", "json"))
    assert d.stop() == 0
    lines = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    assert any("serving on" in e["msg"] for e in lines)
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in lines)


def test_systemd_socket_activation(tmp_path):
    # As systemd does: the listening socket arrives as fd 3 with LISTEN_PID/LISTEN_FDS;
    # the daemon serves on it and leaves the socket file to its owner on exit.
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    launcher = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'sidecar', 'serve'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    log = tmp_path / "activated.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", launcher, str(listener.fileno())],
                                pass_fds=(listener.fileno(),), env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
    listener.close()
    try:
        with Client(path) as c:
            stats = c.stats()
        assert stats.pid == proc.pid and stats.socket == str(path)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert path.exists()  # systemd's socket, not ours to remove


def test_readme_python_example_runs(daemon):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(snippets) == 5
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
    env["LLM_SIDECAR_SOCKET"] = str(daemon.path)
    out = ""
    for snippet in snippets:
        r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                           env=env, timeout=60, cwd="/")
        assert r.returncode == 0, r.stderr
        out += r.stdout
    assert "round trip" in out and "settled $" in out and "100 degrees Celsius" in out
    assert "provider claude-sonnet-4 claude-sonnet-4 says: 42" in out
    assert re.search(r"this call cost \$0\.\d{6}", out)
    assert re.search(r"spent today by all users \$0\.\d{6}: .*bob \$0\.\d{6}", out)


def test_readme_quick_start_has_two_commands():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)[:1]
    commands = [line for line in block.splitlines() if line.strip()]
    assert commands == ["pip install . && llm-sidecar serve",
                        "pip install -e '.[test]' && pytest"]


def test_every_package_is_installed():
    """``pip install .`` ships the packages pyproject lists: a new subpackage left out of
    that list works from a checkout and is missing from every install."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(root).parts)
             for p in (root / "sidecar").rglob("__init__.py")}
    assert found == listed
