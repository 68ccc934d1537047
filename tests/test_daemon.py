"""The vdsm-agent command line, settings precedence, listeners."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys

import pytest

from vdsm_agent import __version__, settings
from vdsm_agent.main import build_parser
from vdsm_agent.server import listeners


def run_agent(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vdsm_agent.main", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_version():
    result = run_agent("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"vdsm-agent {__version__}"


def test_every_setting_has_a_flag():
    help_text = build_parser().format_help()
    for setting in settings.SETTINGS:
        assert setting.option in help_text
    for fixed in ("--config", "--state-dir", "--listen", "--unix-socket", "--log-level",
                  "--allowed-root", "--version"):
        assert fixed in help_text


@pytest.mark.parametrize("address", ["0.0.0.0:54321", "10.1.2.3:80", "example.com:80"])
def test_plain_http_on_non_loopback_is_refused(address, tmp_path):
    result = run_agent("--listen", address, "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "refusing to serve plain HTTP" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "agent.db").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:1", "127.8.9.10:1", "[::1]:1", "localhost:1"])
def test_loopback_addresses_are_allowed(address):
    config = settings.defaults().replace(listen=settings.parse_host_port(address))
    listeners.check_listen_address(config)


def test_bad_flag_value_is_a_clear_error(tmp_path):
    result = run_agent("--max-batch", "zero", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "max_batch" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_then_flags(tmp_path):
    config_file = tmp_path / "agent.conf"
    config_file.write_text(
        "[agent]\nmax_batch = 7\nlog_level = debug\n"
        "allowed_roots =\n    /srv/a\n    /srv/b\n")
    flags = build_parser().parse_args(["--config", str(config_file), "--max-batch", "9"])
    config = settings.resolve(flags.config, flags)
    assert config.max_batch == 9  # the flag wins
    assert config.log_level == "debug"  # from the file
    assert config.allowed_roots == ["/srv/a", "/srv/b"]
    assert config.max_body_size == 1024 * 1024  # built-in default


def test_repeated_allowed_root_flags():
    flags = build_parser().parse_args(["--allowed-root", "/a", "--allowed-root", "/b"])
    assert settings.resolve(None, flags).allowed_roots == ["/a", "/b"]


@pytest.mark.parametrize(("text", "message"), [
    ("[agent]\nno_such_setting = 1\n", "unknown setting"),
    ("[agent]\nmax_batch = -1\n", "max_batch"),
    ("not an ini file", "config file"),
])
def test_bad_config_files_are_refused(tmp_path, text, message):
    config_file = tmp_path / "agent.conf"
    config_file.write_text(text)
    with pytest.raises(settings.SettingsError, match=message):
        settings.resolve(str(config_file), argparse.Namespace())


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = run_agent("--config", str(tmp_path / "nope.conf"))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr


def test_real_agent_answers_on_tcp_and_unix_socket(agent_process):
    assert agent_process.call("ping")["version"] == __version__
    caps = agent_process.call("getCapabilities", unix=True)
    assert caps["apiVersion"] == "1.0"
    mode = stat.S_IMODE(os.stat(agent_process.socket_path).st_mode)
    assert mode == 0o660


def test_real_agent_stops_cleanly_on_sigterm(agent_process):
    agent_process.proc.terminate()
    assert agent_process.proc.wait(timeout=10) == 0
    assert "shutting down" in agent_process.log_path.read_text()


def test_stale_socket_file_is_replaced(agent_process, tmp_path):
    # A restart after kill -9 leaves the socket file behind; the next start reuses it.
    agent_process.proc.kill()
    agent_process.proc.wait()
    assert agent_process.socket_path.exists()
    log_path = tmp_path / "second.log"
    with open(log_path, "wb") as log_file:
        agent_process.proc = subprocess.Popen(agent_process.argv, stdout=log_file,
                                              stderr=subprocess.STDOUT)
    agent_process.log_path = log_path
    agent_process.wait_ready(timeout=20)
    assert agent_process.call("ping", unix=True)["uptime"] < 20


def test_a_regular_file_in_place_of_the_socket_is_not_removed(tmp_path):
    precious = tmp_path / "agent.sock"
    precious.write_text("data")
    result = run_agent("--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0",
                       "--unix-socket", str(precious))
    assert result.returncode == 1
    assert "not a socket" in result.stderr
    assert precious.read_text() == "data"
