"""Configuration: defaults, file, environment, and the errors a user sees."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import config
from sidecar.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_need_no_file():
    c = config.load(None, {})
    assert c.server.max_frame_bytes == 4 * 1024 * 1024
    assert c.socket_mode == 0o660
    assert "please" in c.normalize.filler_words
    assert c.source == "defaults"


def test_file_then_env_override(tmp_path):
    p = write(tmp_path, '[server]\nmax_frame_bytes = 65536\nframe_timeout = 2\n'
                        '[normalize]\nfiller_words = ["Please", "JUST"]\n')
    c = config.load(p, {"LLM_SIDECAR_SERVER_FRAME_TIMEOUT": "0.5",
                        "LLM_SIDECAR_LOG_FORMAT": "json"})
    assert c.server.max_frame_bytes == 65536
    assert c.server.frame_timeout == 0.5
    assert c.log.format == "json"
    assert c.normalize.filler_words == ("just", "please")
    assert c.source == str(p)


def test_config_file_from_env(tmp_path):
    p = write(tmp_path, '[log]\nlevel = "debug"\n')
    assert config.load(None, {"LLM_SIDECAR_CONFIG": str(p)}).log.level == "debug"


@pytest.mark.parametrize("text,source_is_file,key,fragment", [
    ('[server]\nmax_frame_bytes = 12\n', True, "server.max_frame_bytes", ">= 1024"),
    ('[server]\nmax_frame_bytes = "big"\n', True, "server.max_frame_bytes", "Expected `int`"),
    ('[server]\nnope = 1\n', True, "server.nope", "unknown key"),
    ('[nope]\nx = 1\n', True, "nope", "unknown key"),
    ('[server]\nsocket_mode = "rw"\n', True, "server.socket_mode", "invalid mode"),
    ('[server]\nsocket = "relative.sock"\n', True, "server.socket", "not absolute"),
    ('[log]\nlevel = "loud"\n', True, "log.level", "Invalid enum value"),
    ('[normalize]\nfiller_words = ["two words"]\n', True, "normalize.filler_words", "single word"),
    ('[server\n', True, "", "invalid TOML"),
    ('[server]\nidle_timeout = 0\n', True, "server.idle_timeout", "> 0"),
    ('[server]\nmax_connections_per_pid = 0\n', True, "server.max_connections_per_pid", ">= 1"),
])
def test_file_errors_name_file_key_and_hint(tmp_path, text, source_is_file, key, fragment):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(p, {})
    err = info.value
    assert fragment in str(err)
    assert err.source == str(p)
    assert err.key == key
    if key:
        assert err.hint and f"(hint: {err.hint})" in str(err)


def test_env_errors_name_the_variable():
    with pytest.raises(ConfigError) as info:
        config.load(None, {"LLM_SIDECAR_SERVER_MAX_CONNECTIONS": "many"})
    assert info.value.source == "LLM_SIDECAR_SERVER_MAX_CONNECTIONS"
    with pytest.raises(ConfigError, match="unknown setting LLM_SIDECAR_SERVER_TYPO"):
        config.load(None, {"LLM_SIDECAR_SERVER_TYPO": "1"})


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load("/nonexistent/llm.toml", {})


def test_config_is_frozen():
    c = config.load(None, {})
    with pytest.raises(AttributeError):
        c.server.max_frame_bytes = 1  # type: ignore[misc]


def test_client_socket_resolution(tmp_path):
    assert config.client_socket_path("/x/y.sock", {"LLM_SIDECAR_SOCKET": "/a"}) == Path("/x/y.sock")
    assert config.client_socket_path(None, {"LLM_SIDECAR_SOCKET": "/a/b.sock"}) == Path("/a/b.sock")
    runtime = tmp_path / "run"
    runtime.mkdir()
    (runtime / "llm.sock").touch()
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    expected = (config.SYSTEM_SOCKET if config.SYSTEM_SOCKET.exists()
                else runtime / "llm.sock")
    assert config.client_socket_path(None, env) == expected
    candidates = config.default_socket_candidates({})
    assert candidates[0] == Path("/run/llm.sock")
    assert candidates[-1] == Path(f"/tmp/llm-sidecar-{os.getuid()}/llm.sock")


def test_server_socket_resolution(tmp_path):
    c = config.load(None, {"LLM_SIDECAR_SOCKET": str(tmp_path / "e.sock")})
    assert config.server_socket_path(c, None) == tmp_path / "e.sock"
    assert config.server_socket_path(c, "/explicit.sock") == Path("/explicit.sock")
    with pytest.raises(ConfigError, match="not absolute") as info:
        config.server_socket_path(c, "relative.sock")
    assert info.value.source == "--socket" and info.value.key == "server.socket"
    default = config.server_socket_path(config.load(None, {}), None, {})
    expected = ("/run/llm.sock" if os.access("/run", os.W_OK | os.X_OK)
                else f"/tmp/llm-sidecar-{os.getuid()}/llm.sock")
    assert str(default) == expected


def cli(*args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                          text=True, env=full, timeout=60, cwd="/")


def test_cli_config_check(tmp_path):
    good = write(tmp_path, '[server]\nmax_connections = 10\n')
    r = cli("config", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert '"max_connections": 10' in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nmax_connections = 0\n')
    r = cli("config", "check", str(bad))
    assert r.returncode == 2
    assert str(bad) in r.stderr and "server.max_connections" in r.stderr and "hint:" in r.stderr


def test_serve_with_bad_config_exits_2(tmp_path):
    bad = write(tmp_path, '[server]\nframe_timeout = -1\n')
    r = cli("serve", "--socket", str(tmp_path / "s.sock"), "--config", str(bad))
    assert r.returncode == 2
    assert "server.frame_timeout" in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "llm-sidecar"
    assert script.exists() and os.stat(script).st_mode & stat.S_IXUSR
    r = subprocess.run([str(script), "version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("llm-sidecar ")


def test_usage_error_exits_2():
    assert cli("frobnicate").returncode == 2
