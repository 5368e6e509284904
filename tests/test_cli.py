"""The `plmjax` command: input errors are one line on stderr (exit 2), bugs keep tracebacks."""

import json
import sys
import types

import pytest

from plmjax import cli
from plmjax.errors import ConfigError


@pytest.fixture
def fake_command(monkeypatch):
  """Registers `plmjax fake`, whose main raises what the test puts in `calls["raise"]`."""
  calls = {}
  module = types.ModuleType("plmjax_fake_command")
  module.add_arguments = lambda parser: parser.add_argument("--path", required=True)

  def main(args, overrides):
    calls.update(path=args.path, overrides=overrides)
    if "raise" in calls:
      raise calls["raise"]
    return calls.get("rc", 0)

  module.main = main
  monkeypatch.setitem(sys.modules, module.__name__, module)
  monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "a test command"))
  return calls


def one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("plmjax: error: "), err
  assert "Traceback" not in err and "usage:" not in err
  return lines[0]


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND (see `plmjax --help`)"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["fake"], "the following arguments are required: --path (see `plmjax fake --help`)"),
    (["fake", "--path", "p", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_command_line_mistakes_are_one_line(fake_command, capsys, argv, message):
  assert cli.main(argv) == 2
  assert message in one_error_line(capsys)
  assert "path" not in fake_command  # nothing ran


def test_overrides_reach_the_command_and_its_exit_code_is_returned(fake_command):
  fake_command["rc"] = 143
  assert cli.main(["fake", "--path", "p", "--config.train.steps=3"]) == 143
  assert fake_command["overrides"] == ["--config.train.steps=3"]


def test_user_error_is_one_line_and_debug_shows_the_traceback(fake_command, capsys):
  fake_command["raise"] = ConfigError("config.train.steps=0 must be a positive integer\n(twice)")
  assert cli.main(["fake", "--path", "p"]) == 2
  assert one_error_line(capsys) == (
      "plmjax: error: config.train.steps=0 must be a positive integer (twice)")
  with pytest.raises(ConfigError):
    cli.main(["fake", "--path", "p", "--debug"])


def test_os_error_is_one_line(fake_command, capsys):
  fake_command["raise"] = PermissionError(13, "Permission denied", "/readonly/run")
  assert cli.main(["fake", "--path", "p"]) == 2
  line = one_error_line(capsys)
  assert "Permission denied: '/readonly/run'" in line and "--debug" in line


def test_unexpected_exception_keeps_its_traceback(fake_command):
  fake_command["raise"] = RuntimeError("a bug")
  with pytest.raises(RuntimeError, match="a bug"):
    cli.main(["fake", "--path", "p"])


def test_ctrl_c_outside_training_exits_130(fake_command, capsys):
  fake_command["raise"] = KeyboardInterrupt()
  assert cli.main(["fake", "--path", "p"]) == 130
  assert capsys.readouterr().err.strip() == "plmjax: interrupted"


def test_version_and_print_config(tmp_path, capsys):
  with pytest.raises(SystemExit) as done:
    cli.main(["--version"])
  assert done.value.code == 0 and capsys.readouterr().out.startswith("plmjax ")
  assert cli.main(["pretrain", "--config", "configs/bert_tiny.py", "--workdir",
                   str(tmp_path / "w"), "--print-config", "--config.train.steps=7"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["train"]["steps"] == 7 and printed["model"]["arch"] == "bert"
  assert not (tmp_path / "w").exists()


def test_training_on_own_text_but_evaluating_on_builtin_text_is_pointed_out(tmp_path, capsys):
  corpus = tmp_path / "mine.txt"
  corpus.write_text("A sentence of mine.\nAnother one.\n")
  rc = cli.main(["pretrain", "--config", "configs/bert_tiny.py", "--workdir", str(tmp_path / "w"),
                 f"--config.data.train={corpus}", "--config.mesh.data=64"])
  out, err = capsys.readouterr()
  assert rc == 2 and "needs 64 devices" in err  # stops before any work
  assert f"training on {corpus} but evaluating on the built-in builtin:python-docs" in out
  assert "plmjax: config (--print-config prints it as JSON):" in out
