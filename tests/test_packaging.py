"""The packaging files agree with the code and with each other (fast, always runs).

The packages themselves are built, linted, installed into a fresh chroot and
exercised by packaging/test (scripts/test runs it before pytest); these tests
check what can be checked without building: versions, the unit's settings,
the generated config file, man pages and wrappers, and the dependency split.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import vdsm_agent
from vdsm_agent import settings
from vdsm_agent.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
AGENT_UNIT = PACKAGING / "systemd" / "vdsm-agent.service"
ENGINE_UNIT = PACKAGING / "systemd" / "vdsm-engine.service"
SPEC = PACKAGING / "rpm" / "vdsm-agent.spec"
CONTROL = PACKAGING / "debian" / "control"
REQUIREMENTS = PACKAGING / "vendor" / "requirements.txt"

# Options that give the service its own mount namespace (its mounts would not
# reach the host, and a restarted agent would not see its predecessor's) or
# restrict devices. docs/packaging.md explains each.
NAMESPACE_OR_DEVICE_OPTIONS = {
    "PrivateMounts", "PrivateTmp", "PrivateDevices", "ProtectSystem", "ProtectHome",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "ProtectClock", "ProtectHostname", "MountFlags", "MountAPIVFS",
    "RootDirectory", "RootImage", "DynamicUser", "PrivateUsers", "PrivateNetwork",
    "DevicePolicy", "DeviceAllow", "MemoryDenyWriteExecute", "NoNewPrivileges",
}


def load_generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("packaging_generate", PACKAGING / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generate = load_generate()


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values, in order (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    return parser


def install_requires() -> dict[str, Requirement]:
    raw = setup_cfg().get("options", "install_requires")
    requirements = [Requirement(line.strip()) for line in raw.splitlines() if line.strip()]
    return {canonicalize_name(req.name): req for req in requirements}


def vendored() -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes) from packaging/vendor/requirements.txt."""
    text = REQUIREMENTS.read_text(encoding="utf-8").replace("\\\n", " ")
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert match, f"requirements.txt: not NAME==VERSION --hash=sha256:...: {line!r}"
        pins[canonicalize_name(match.group(1))] = (
            match.group(2), re.findall(r"sha256:([0-9a-f]{64})", match.group(3)))
    return pins


def control_depends() -> dict[str, str]:
    """Binary package Depends of debian/control: package -> version constraint."""
    text = CONTROL.read_text(encoding="utf-8")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    binary = text.split("\nPackage: ", 1)[1]
    field = re.search(r"^Depends:(.*?)(?=^\S)", binary, re.S | re.M)
    assert field
    depends: dict[str, str] = {}
    for item in field.group(1).split(","):
        item = " ".join(item.split())
        if item and not item.startswith("${"):
            name, _, constraint = item.partition(" ")
            depends.setdefault(name, constraint)
    return depends


def debian_name(pypi_name: str) -> str:
    return {"attrs": "python3-attr"}.get(pypi_name, "python3-" + pypi_name)


# -- versions ------------------------------------------------------------------------


def test_versions_agree() -> None:
    version = vdsm_agent.__version__
    assert setup_cfg().get("metadata", "version") == "attr: vdsm_agent.__version__"
    changelog = (PACKAGING / "debian" / "changelog").read_text(encoding="utf-8")
    match = re.match(r"vdsm-agent \(([^)]+)\) \S+; urgency=\w+\n", changelog)
    assert match, "debian/changelog: first line is not 'vdsm-agent (VERSION) DIST; urgency=...'"
    assert match.group(1).rsplit("-", 1)[0] == version, "debian/changelog"
    spec = SPEC.read_text(encoding="utf-8")
    assert re.search(rf"^Version:\s+{re.escape(version)}$", spec, re.M), "rpm spec Version:"
    changelog_entry = re.search(r"^%changelog\n\* .* - (\S+)$", spec, re.M)
    assert changelog_entry
    assert changelog_entry.group(1).rsplit("-", 1)[0] == version


# -- the agent's unit ----------------------------------------------------------------


def test_restart_does_not_kill_tasks() -> None:
    service = read_unit(AGENT_UNIT)["Service"]
    assert one(service, "KillMode") == "process"
    assert one(service, "ExecStart") == (
        "/usr/bin/vdsm-agent --config /etc/vdsm-agent/vdsm-agent.conf")


def test_unit_directories_match_the_packaged_config() -> None:
    service = read_unit(AGENT_UNIT)["Service"]
    assert one(service, "StateDirectory") == "vdsm-agent"
    assert one(service, "RuntimeDirectory") == "vdsm-agent"
    assert one(service, "RuntimeDirectoryPreserve") == "yes"
    assert one(service, "ConfigurationDirectory") == "vdsm-agent"
    values = generate.SYSTEM_VALUES
    assert values["state_dir"] == "/var/lib/" + one(service, "StateDirectory")
    runtime = "/run/" + one(service, "RuntimeDirectory") + "/"
    assert values["unix_socket"].startswith(runtime)
    assert values["mount_root"].startswith(runtime)
    assert "/" + one(service, "ConfigurationDirectory").join(["etc/", "/"]) \
        in generate.CONFIG_FILE


def test_unit_keeps_the_host_mount_namespace_and_devices() -> None:
    service = read_unit(AGENT_UNIT)["Service"]
    used = NAMESPACE_OR_DEVICE_OPTIONS & set(service)
    assert not used, f"options that break mounts, devices or helpers: {sorted(used)}"
    # What it does have (each explained in docs/packaging.md):
    for key in ("LockPersonality", "RestrictRealtime", "RestrictSUIDSGID", "RestrictNamespaces"):
        assert one(service, key) == "yes"
    families = one(service, "RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)
    capabilities = one(service, "CapabilityBoundingSet")
    assert capabilities.startswith("~"), "a deny-list: the agent needs CAP_SYS_ADMIN and more"
    assert "CAP_SYS_ADMIN" not in capabilities
    assert "CAP_NET_BIND_SERVICE" not in capabilities
    syscalls = one(service, "SystemCallFilter")
    assert syscalls.startswith("~")
    assert "@mount" not in syscalls
    assert "@module" not in syscalls


def test_hardening_choices_are_documented() -> None:
    doc = (ROOT / "docs" / "packaging.md").read_text(encoding="utf-8")
    service = read_unit(AGENT_UNIT)["Service"]
    for key in service:
        assert f"`{key}" in doc, f"docs/packaging.md does not explain {key}="
    for key in ("PrivateMounts", "PrivateDevices", "ProtectSystem", "ProtectClock",
                "ProtectHostname", "NoNewPrivileges", "MemoryDenyWriteExecute"):
        assert f"`{key}" in doc, f"docs/packaging.md does not say why there is no {key}="


def test_engine_unit_runs_the_engine() -> None:
    unit = read_unit(ENGINE_UNIT)
    assert one(unit["Service"], "ExecStart").split()[0] == "/usr/bin/vdsm-engine"
    assert one(unit["Install"], "WantedBy") == "multi-user.target"
    # It mounts nothing and runs no tasks: the full sandbox, no static account.
    assert one(unit["Service"], "DynamicUser") == "yes"
    assert one(unit["Service"], "ProtectSystem") == "strict"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("unit", [AGENT_UNIT, ENGINE_UNIT], ids=lambda path: path.name)
def test_units_parse(unit: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, check=False)
    # The binary is not installed here; anything else systemd complains about counts.
    problems = [line for line in result.stderr.splitlines()
                if line.strip() and "is not executable" not in line]
    assert not problems, "\n".join(problems)


# -- generated files -------------------------------------------------------------------


def test_default_config_sets_the_system_values(tmp_path: Path) -> None:
    path = tmp_path / "vdsm-agent.conf"
    path.write_text(generate.render_config(), encoding="utf-8")
    values = settings.read_config_file(str(path))
    expected = {name: value for name, value in generate.SYSTEM_VALUES.items()
                if name in settings.BY_NAME}
    assert {"state_dir", "unix_socket", "mount_root"} <= set(expected)
    assert values == expected


def test_default_config_documents_every_setting() -> None:
    text = generate.render_config()
    blocks = text.split("\n\n")
    for setting in settings.SETTINGS:
        block = next((block for block in blocks
                      if re.search(rf"^#{setting.name} =", block, re.M)), None)
        assert block, f"{setting.name}: no commented default"
        comments = " ".join(line[2:] for line in block.splitlines() if line.startswith("# "))
        assert " ".join(setting.help.split()) in comments, setting.name
        assert f"Default: {settings.format_default(setting)}." in comments, setting.name
        assert f"Flag: {setting.option}." in comments, setting.name


def man_text(page: str) -> str:
    """Roff with the escapes this generator uses undone, for substring checks."""
    return page.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")


def test_agent_man_page_lists_every_flag() -> None:
    page = man_text(generate.page_agent())
    for action in build_parser()._actions:
        if action.dest == "help":  # argparse-manpage leaves -h/--help out
            continue
        for option in action.option_strings:
            assert option in page, option
    for setting in settings.SETTINGS:
        assert setting.option in page


def test_client_man_page_lists_every_option_and_exit_code() -> None:
    import rpc_schema
    from vdsm_agent.client import main as client

    page = man_text(generate.page_client())
    for action in client.build_parser(rpc_schema.load("agent"))._actions:
        for option in action.option_strings:
            assert option in page, option
    assert ".SH EXIT STATUS" in page
    for code in (client.EXIT_OK, client.EXIT_APPLICATION_ERROR, client.EXIT_USAGE,
                 client.EXIT_PROTOCOL_ERROR, client.EXIT_UNREACHABLE):
        assert re.search(rf"^  {code}  ", page, re.M), code


def test_man_pages_in_the_tree_are_current() -> None:
    """man/ is what packaging/generate.py makes now (readable from a checkout with
    man -l; the packages install it)."""
    pages = generate.manpages(generate.console_scripts())
    kept = {path.name for path in (ROOT / "man").iterdir()}
    assert kept == set(pages), "regenerate: .venv/bin/python packaging/generate.py --out . manpages"
    for name, text in pages.items():
        assert (ROOT / "man" / name).read_text(encoding="utf-8") == text, (
            f"man/{name} is stale: .venv/bin/python packaging/generate.py --out . manpages")
    assert "vdsm-engine-call.1" in pages  # the engine's client has its own page


def test_completion_scripts_for_the_client_programs(tmp_path: Path) -> None:
    assert generate.main(["--out", str(tmp_path), "completions"]) == 0
    names = {str(path.relative_to(tmp_path / "completion"))
             for path in (tmp_path / "completion").rglob("*")}
    assert {"bash/vdsm-agent-client", "zsh/_vdsm-agent-client", "bash/vdsm-engine",
            "zsh/_vdsm-engine"} <= names
    for packaging_file in (PACKAGING / "debian" / "rules", SPEC):
        text = packaging_file.read_text(encoding="utf-8")
        assert "completions" in text, packaging_file.name
        assert "completion/bash/" in text, packaging_file.name


def test_config_man_page_lists_every_setting() -> None:
    page = man_text(generate.page_config())
    for setting in settings.SETTINGS:
        assert f"\\fB{setting.name}\\fR" in page, setting.name


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_man_pages_have_no_roff_warnings() -> None:
    for name, page in generate.manpages(generate.console_scripts()).items():
        result = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8"], input=page,
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert not result.stderr.strip(), f"{name}: {result.stderr}"


def test_a_page_and_wrapper_for_every_console_script() -> None:
    scripts = generate.console_scripts()
    assert {"vdsm-agent", "vdsm-agent-client"} <= set(scripts)
    pages = generate.manpages(scripts)
    assert set(pages) >= {"vdsm-agent.8", "vdsm-agent-client.1", "vdsm-agent.conf.5"}
    for name, target in scripts.items():
        wrapper = generate.render_wrapper(name)
        assert wrapper.startswith("#!/bin/sh\n")
        assert wrapper.rstrip().endswith(
            f'exec /usr/lib/vdsm-agent/bin/python3 -I /usr/lib/vdsm-agent/scripts/{name} "$@"')
        entry = generate.render_entry(name, target)
        compile(entry, name, "exec")
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_a_new_console_script_gets_a_stub_page_and_a_wrapper(tmp_path: Path) -> None:
    # The engine's entry point will be added later: packaging must follow by itself.
    cfg = tmp_path / "setup.cfg"
    cfg.write_text("[options.entry_points]\nconsole_scripts =\n"
                   "    vdsm-agent = vdsm_agent.main:main\n"
                   "    vdsm-engine = vdsm_agent.engine.no_such_module:main\n", encoding="utf-8")
    out = tmp_path / "out"
    assert generate.main(["--out", str(out), "--setup-cfg", str(cfg),
                          "manpages", "wrappers"]) == 0
    stub = (out / "man" / "vdsm-engine.8").read_text(encoding="utf-8")
    assert ".SH NAME" in stub
    assert "vdsm\\-engine \\-\\-help" in stub
    assert (out / "bin" / "vdsm-engine").stat().st_mode & 0o111
    assert "from vdsm_agent.engine.no_such_module import main" in \
        (out / "scripts" / "vdsm-engine").read_text(encoding="utf-8")


# -- dependencies ------------------------------------------------------------------------


def test_every_requirement_is_vendored_or_a_debian_dependency() -> None:
    pins = vendored()
    depends = control_depends()
    for name, requirement in install_requires().items():
        in_debian = debian_name(name) in depends
        assert (name in pins) != in_debian, (
            f"{name}: must be either vendored (packaging/vendor/requirements.txt) or a "
            f"Depends of packaging/debian/control, not {'both' if in_debian else 'neither'}")
        if name in pins:
            version = pins[name][0]
            assert requirement.specifier.contains(version), \
                f"{name}=={version} does not satisfy setup.cfg's {requirement}"


def test_vendored_pins_have_hashes() -> None:
    pins = vendored()
    assert {"jsonrpcserver", "oslash"} <= set(pins), "not packaged in Debian 12"
    for name, (version, hashes) in pins.items():
        assert hashes, f"{name}=={version}: no --hash"


def test_the_rpm_bundles_and_requires_the_same_split() -> None:
    spec = SPEC.read_text(encoding="utf-8")
    bundled = dict(re.findall(r"^Provides:\s+bundled\(python3dist\(([^)]+)\)\) = (\S+)$",
                              spec, re.M))
    assert bundled == {name: version for name, (version, _) in vendored().items()}
    requires = set(re.findall(r"^Requires:\s+python%\{python3_pkgversion\}-(\S+)", spec, re.M))
    debian = {name.removeprefix("python3-") for name in control_depends()
              if name.startswith("python3-")}
    # Fedora's names where they differ from Debian's.
    fedora = {"attr": "attrs", "prometheus-client": "prometheus_client"}
    assert {fedora.get(name, name) for name in debian} == requires
    excluded = re.search(r"^%global __requires_exclude .*\(\((.*?)\)\\\\\)$", spec, re.M)
    assert excluded
    assert set(excluded.group(1).split("|")) == set(vendored())


def test_config_file_is_preserved_on_upgrade() -> None:
    spec = SPEC.read_text(encoding="utf-8")
    assert re.search(r"^%config\(noreplace\) %\{_sysconfdir\}/vdsm-agent/vdsm-agent\.conf$",
                     spec, re.M)
    install = (PACKAGING / "debian" / "vdsm-agent.install").read_text(encoding="utf-8")
    # debhelper makes every file under /etc a conffile.
    assert "build/packaging/vdsm-agent.conf etc/vdsm-agent/" in install.splitlines()


def test_purge_never_deletes_under_a_mount() -> None:
    postrm = (PACKAGING / "debian" / "vdsm-agent.postrm").read_text(encoding="utf-8")
    assert "/proc/self/mountinfo" in postrm
    assert "rm -rf --one-file-system" in postrm
    assert postrm.index('has_mounts "$dir"') < postrm.index("rm -rf --one-file-system")


def test_ci_runs_the_packaging_test_before_pytest() -> None:
    lines = (ROOT / "scripts" / "test").read_text(encoding="utf-8").strip().splitlines()
    assert lines[-1].split(";")[-1].strip().startswith("exec .venv/bin/pytest")
    assert any(line.strip().endswith("packaging/test") for line in lines[:-1])


def test_the_generator_documents_only_options_it_has(capsys: pytest.CaptureFixture[str]) -> None:
    """Its docstring's usage line drifted (it named an --interpreter it did not have)."""
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    offered = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    usage = (generate.__doc__ or "").split("\n\n")[1]
    documented = set(re.findall(r"--[a-z][a-z-]*", usage))
    assert documented
    assert documented <= offered


def test_console_scripts_are_read_as_setuptools_reads_them(tmp_path: Path) -> None:
    """An entry point's value is parsed (extras dropped), comments are comments, and
    the other groups are not scripts (setup.cfg was split by hand)."""
    cfg = tmp_path / "setup.cfg"
    cfg.write_text("[options.entry_points]\nconsole_scripts =\n"
                   "    # old-name = gone:main\n"
                   "    vdsm-agent=vdsm_agent.main:main\n"
                   "    Tool-X = pkg.mod:func [extra]\n"
                   "gui_scripts =\n    other = a:b\n", encoding="utf-8")
    assert generate.console_scripts(cfg) == {"vdsm-agent": "vdsm_agent.main:main",
                                             "Tool-X": "pkg.mod:func"}
