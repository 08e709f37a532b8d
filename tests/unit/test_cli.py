"""The `processor` command explains itself: help texts, defaults, settings before or after
the command, --version, and the README's command and exit-status tables."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest

from processor import cli
from processor.cli import COMMANDS, _parser, main
from processor.config import SETTINGS
from tests.support import ROOT, readme_table

SETTING_DESTS = {s.env for s in SETTINGS}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_explains_itself_and_every_option_has_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sub = _commands()[command]
    assert sub.description is not None
    assert len(sub.description) > 40, command
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert (action.help or "").strip(), f"{command} {action.option_strings}"
    text = _help(capsys, command)
    # the description, and the usage line shows the command's own options, not 30 settings
    assert sub.description.split()[0] in text
    usage = text.split("\n\n")[0]
    assert "--kafka-bootstrap-servers" not in usage
    assert "--kafka-bootstrap-servers" in text  # listed under "settings"
    assert "Exit status" in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_option_shows_an_empty_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty string is no default to show (audit's --replayed-groups read "(default: )")."""
    assert "(default: )" not in _help(capsys, command)


def test_the_audits_own_exit_statuses_include_an_unreachable_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    description = " ".join(_help(capsys, "audit").split("options:")[0].split())
    assert "1 failure, 2 usage, 4 Kafka or PostgreSQL cannot be reached." in description


@pytest.mark.parametrize("command", ["run", "migrate", "topics", "demo"])
def test_the_commands_that_had_an_empty_help_say_what_they_do(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help(capsys, command)
    before_options = text.split("options:")[0]
    usage = re.match(r"usage: [^\n]*(\n +[^\n]+)*\n", before_options)
    assert usage is not None
    assert len(before_options[usage.end() :].split()) > 15, before_options


def test_defaults_are_shown(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help(capsys, "run").split())
    assert "[PROCESSOR_METRICS_PORT; default: 9108]" in text
    assert "[PROCESSOR_LANES; default: 2]" in text
    assert "[PROCESSOR_REPLY_TOPIC; default: replies]" in text
    send = " ".join(_help(capsys, "send").split())
    assert "seconds to wait for the reply (default: 30.0)" in send


def test_settings_are_accepted_before_and_after_the_command() -> None:
    parse = _parser().parse_args
    assert parse(["run", "--group-id", "x"]).PROCESSOR_GROUP_ID == "x"
    assert parse(["--group-id", "x", "run"]).PROCESSOR_GROUP_ID == "x"
    both = parse(["--group-id", "before", "run", "--group-id", "after"])
    assert both.PROCESSOR_GROUP_ID == "after"
    kept = parse(["--group-id", "before", "send", "--timeout", "3", "{}"])
    assert kept.PROCESSOR_GROUP_ID == "before"
    assert not hasattr(parse(["run"]), "PROCESSOR_GROUP_ID")  # absent: the environment's


def test_a_setting_after_the_command_reaches_the_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`processor migrate --lanes abc` fails on the value (a setting), not on the usage."""
    assert main(["migrate", "--lanes", "abc"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "processor: configuration error: --lanes='abc': must be a whole number from 1 to 256\n"
    )


#: The entry point, then one log line: what format did the command's settings give it?
LOG_AFTER_MAIN = """
import sys
from processor import cli
from processor.log import get_logger
cli.main(sys.argv[1:])
get_logger("processor.test").info("after main", n=1)
"""


def _log_line_after(*argv: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", LOG_AFTER_MAIN, *argv, "schemas", "--check"],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    (line,) = [x for x in done.stderr.splitlines() if "after main" in x]
    return line


@pytest.mark.parametrize(
    ("argv", "env"),
    [((), {"PROCESSOR_LOG_FORMAT": "console"}), (("--log-format", "console"), {})],
    ids=["variable", "flag"],
)
def test_the_log_format_setting_reaches_the_logs(
    argv: tuple[str, ...], env: dict[str, str]
) -> None:
    """PROCESSOR_LOG_FORMAT=console (or the flag) gives text lines, not JSON (a merge had
    dropped it: the setting was read, checked, and ignored)."""
    line = _log_line_after(*argv, **env)
    assert not line.startswith("{"), line
    assert "after main" in line
    assert "n=1" in line
    default = json.loads(_log_line_after())
    assert (default["event"], default["n"], default["level"]) == ("after main", 1, "info")


def test_processor_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"processor {metadata.version('processor')}\n"


# --- the README's tables --------------------------------------------------------------------


def test_the_readme_exit_status_table_is_the_clis() -> None:
    rows = readme_table("Exit statuses mean the same in every command")
    documented = {int(row[0]) for row in rows}
    codes = {
        cli.EXIT_OK,
        cli.EXIT_FAULT,
        cli.EXIT_USAGE,
        cli.EXIT_TIMEOUT,
        cli.EXIT_UNREACHABLE,
        cli.EXIT_INTERRUPTED,
    }
    assert documented == codes
    stderr = {int(row[0]): row[2] for row in rows}
    assert "processor: configuration error:" in stderr[cli.EXIT_USAGE]
    assert "processor: bad request:" in stderr[cli.EXIT_USAGE]
    assert "processor: service unreachable:" in stderr[cli.EXIT_UNREACHABLE]
    assert "processor send: no reply to" in stderr[cli.EXIT_TIMEOUT]


def test_the_readme_command_table_lists_every_command_and_only_documented_exits() -> None:
    rows = readme_table("| command | what it does | prints on stdout | exit |")
    named = {row[0].strip("`").split()[1] for row in rows}
    assert named == COMMANDS
    documented = {int(row[0]) for row in readme_table("Exit statuses mean the same")}
    for row in rows:
        exits = {int(n) for n in re.findall(r"(?<![\w<])(\d+)(?![\w>])", row[3])}
        assert exits <= documented, row
        assert 0 in exits, row
        if row[0].strip("`").split()[1] != "schemas":
            assert {cli.EXIT_USAGE, cli.EXIT_UNREACHABLE} <= exits, row  # every service user


def test_the_readme_configuration_table_names_every_setting() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Configuration") : text.index("## Commands")]
    for setting in SETTINGS:
        assert f"`{setting.env}`" in section, setting.env
        assert f"`{setting.flag}`" in section or setting.env in (
            "KAFKA_SSL_CERTFILE",  # one row: "same names"
            "KAFKA_SSL_KEYFILE",
            "KAFKA_SSL_KEY_PASSWORD_FILE",
        ), setting.flag


def test_the_bootstrap_noise_filter_drops_only_aiokafkas_per_host_bootstrap_lines() -> None:
    import logging

    noise = cli._BootstrapNoise()

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, msg, ("h", 1, "e"), None)

    assert not noise.filter(record('Unable connect to "%s:%s": %s'))
    assert not noise.filter(record('Unable to request metadata from "%s:%s": %s'))
    assert noise.filter(record("Unable connect to node with id %s: %s"))
    assert noise.filter(record("Heartbeat failed: %s %s %s"))
