"""Every `leanlm` subcommand is one entry of leanlm.cli.COMMANDS: a module in its room with
add_arguments(p) and run(args) -> int, imported only when that subcommand runs."""
import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from leanlm.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def _options(p: argparse.ArgumentParser) -> set:
    return {s for a in p._actions for s in (a.option_strings or [a.dest])}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_module_and_help(name, capsys):
    module, help_ = COMMANDS[name]
    mod = importlib.import_module(module)
    assert callable(mod.add_arguments) and callable(mod.run), module
    assert module.startswith("leanlm.") and module.count(".") == 2 and help_  # a module in a room
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: leanlm {name} ")
    own = argparse.ArgumentParser(prog=f"leanlm {name}")  # the module's own flags, every one in the help
    mod.add_arguments(own)
    sub = build_parser(name)._subparsers._group_actions[0].choices[name]
    assert _options(sub) == _options(own)
    for opt in _options(own) - {"help"}:
        assert opt.startswith("-") is False or opt in out, (name, opt)


def test_top_level_help_lists_the_dict(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "{" + ",".join(COMMANDS) + "}" in out.replace("\n", "").replace(" ", "")
    for name, (_, help_) in COMMANDS.items():
        assert help_.split()[0] in out, name
    with pytest.raises(SystemExit) as e:
        main(["nosuch"])
    assert e.value.code == 2 and "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_only_the_running_command_is_imported():
    """Building the parser for one subcommand imports that command's module, not the others' rooms."""
    code = ("import sys\nfrom leanlm.cli import COMMANDS, build_parser\n"
            "build_parser('info')\n"
            "mods = {m for m, _ in COMMANDS.values()}\n"
            "print(sorted(m for m in mods if m in sys.modules))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('leanlm.serve', 'leanlm.peft', 'leanlm.compress', "
            "'leanlm.train', 'leanlm.infer'))))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["['leanlm.eval.info_cli']", "[]"]


def test_cli_holds_no_command_code():
    """leanlm/cli.py is the dict, the shared model and sampling arguments and main: no cmd_* left."""
    import leanlm.cli as cli

    assert not [n for n in vars(cli) if n.startswith("cmd_")]
    assert len((ROOT / "leanlm" / "cli.py").read_text().splitlines()) < 150
