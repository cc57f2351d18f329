"""The settings that gate cell transports and SSH (nanod/config.py, nanod/cli.py): test
cells are off unless `allow_test_cells: true` or `nanod serve --allow-test-cells` (both
spellings are used by external tools); `ssh` has its defaults, refuses unknown keys and
unsound values, and its key directory defaults to DATA_DIR/keys."""

from __future__ import annotations

import pytest

from nanod import cli, config
from reconciler.cells import CellConnections, SshOptions
from state.cell_transport import CellRules


def settings_of(argv: list[str]) -> dict:
    return cli._settings(cli.build_parser().parse_args(argv))


def test_test_cells_are_off_unless_the_setting_or_the_flag_says_so(tmp_path):
    data = str(tmp_path / "data")
    assert settings_of(["serve", "--data-dir", data])["allow_test_cells"] is False
    assert settings_of(["serve", "--data-dir", data, "--allow-test-cells"])[
        "allow_test_cells"] is True
    assert settings_of(["reconcile", "--once", "--data-dir", data, "--allow-test-cells"])[
        "allow_test_cells"] is True
    conf = tmp_path / "nanod.yaml"
    conf.write_text("allow_test_cells: true\n")
    on = settings_of(["serve", "--config", str(conf), "--data-dir", data])
    assert on["allow_test_cells"] is True  # the flag's absence does not turn it off
    assert CellRules.from_settings(on) == CellRules(allow_test_cells=True,
                                                    key_dir=f"{data}/keys")
    conf.write_text("allow_test_cells: yes please\n")
    with pytest.raises(SystemExit, match="allow_test_cells must be true or false"):
        settings_of(["serve", "--config", str(conf)])


def test_ssh_settings_have_defaults_and_refuse_nonsense(tmp_path):
    settings = config.load(None, {"data_dir": str(tmp_path)})
    assert settings["ssh"] == {"key_dir": f"{tmp_path}/keys", "connect_timeout": 10,
                               "command_timeout": 60, "trust_on_first_use": True}
    assert SshOptions.from_settings(settings) == SshOptions(10.0, 60.0, True)
    conf = tmp_path / "nanod.yaml"
    conf.write_text("ssh: {key_dir: /etc/nano/keys/, connect_timeout: 2.5, "
                    "trust_on_first_use: false}\n")
    settings = config.load(str(conf), {})
    assert settings["ssh"] == {"key_dir": "/etc/nano/keys", "connect_timeout": 2.5,
                               "command_timeout": 60, "trust_on_first_use": False}
    connections = CellConnections.from_settings(settings)
    assert connections.ssh == SshOptions(2.5, 60.0, False)
    for text, says in [
        ("ssh: {timeout: 3}", "ssh takes the keys key_dir, connect_timeout"),
        ("ssh: {connect_timeout: 0}", "ssh.connect_timeout must be a number of seconds > 0"),
        ("ssh: {command_timeout: true}", "ssh.command_timeout must be a number"),
        ("ssh: {trust_on_first_use: 1}", "ssh.trust_on_first_use must be true or false"),
        ("ssh: {key_dir: keys}", "ssh.key_dir: 'keys' must be an absolute path"),
        ("ssh: {key_dir: '/etc/my keys'}", "ssh.key_dir: '/etc/my keys' must be an absolute"),
    ]:
        conf.write_text(text + "\n")
        with pytest.raises(SystemExit, match=f"^nanod: {says}"):
            config.load(str(conf), {})


def test_the_ssh_wrapper_carries_the_timeouts(tmp_path):
    from state.cell_transport import CellTransport

    connections = CellConnections(data_dir=str(tmp_path),
                                  ssh=SshOptions(connect_timeout=2.5, command_timeout=30))
    uri = connections.uri(CellTransport("ssh", host="192.0.2.4", user="root", ssh_port=22,
                                        key_file="/k/id"))
    wrapper = tmp_path / "ssh-known-hosts-wrapper"
    assert uri == (f"qemu+ssh://root@192.0.2.4:22/system?keyfile=/k/id&command={wrapper}"
                   "&no_tty=1")
    script = wrapper.read_text()
    for option in (f"UserKnownHostsFile={tmp_path}/known_hosts", "StrictHostKeyChecking=yes",
                   "UpdateHostKeys=no", "BatchMode=yes", "ConnectTimeout=3",
                   "ConnectionAttempts=1", "ServerAliveInterval=10", "ServerAliveCountMax=3"):
        assert f"-o {option} " in script, option
    assert connections.uri(CellTransport("local")) == "qemu:///system"
