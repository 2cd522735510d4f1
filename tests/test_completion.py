"""Shell completion (issue 26 item 8): ``rbees completion bash|zsh|fish`` and the same for
``rbees-pool`` print a script; the shell then runs the CLI with ``_<PROGRAM>_COMPLETE`` set
and gets the commands, subcommands and options. Real processes, and a real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rbees_core.programs.cli_common import complete_var

BIN = Path(sys.executable).parent
PROGRAMS = ["rbees", "rbees-pool"]


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_script_names_the_program_and_its_variable(program: str, shell: str) -> None:
    done = run(program, "completion", shell)
    assert done.returncode == 0, done.stderr
    assert complete_var(program) in done.stdout and program in done.stdout
    assert f"complete_{shell}" in done.stdout


def test_an_unknown_shell_is_a_usage_error() -> None:
    done = run("rbees", "completion", "tcsh")
    assert done.returncode == 2 and "tcsh" in done.stderr


def test_bash_completes_commands_subcommands_and_options(tmp_path: Path) -> None:
    """The script, sourced in a real bash, completes through the real programs."""
    bash = shutil.which("bash")
    assert bash, "bash is needed for this test"
    scripts = tmp_path / "completions.bash"
    scripts.write_text("\n".join(run(p, "completion", "bash").stdout for p in PROGRAMS))

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        function = "_" + words[0].replace("-", "_") + "_completion"
        probe = (f'PATH="{BIN}:$PATH"; source {scripts}; COMP_WORDS=({line}); '
                 f'COMP_CWORD={len(words) - 1}; {function} {words[0]}; '
                 'printf "%s\\n" "${COMPREPLY[@]}"')
        done = subprocess.run([bash, "--norc", "-c", probe], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("rbees", "jo") == ["jobs"]
    assert {"start", "stop", "status"} <= set(complete("rbees-pool", "daemon", "st"))
    assert "--format" in complete("rbees", "jobs", "list", "--f")
    assert complete("rbees", "completion", "z") == ["zsh"]


def test_zsh_and_fish_get_their_answers() -> None:
    pool = complete_var("rbees-pool")
    zsh = run("rbees", env={complete_var("rbees"): "complete_zsh",
                            "_TYPER_COMPLETE_ARGS": "rbees jobs li"})
    assert "list" in zsh.stdout, zsh.stderr
    fish = run("rbees-pool", env={pool: "complete_fish", "_TYPER_COMPLETE_FISH_ACTION":
                                  "get-args", "_TYPER_COMPLETE_ARGS": "rbees-pool dae"})
    assert fish.stdout.startswith("daemon\t"), fish.stderr

