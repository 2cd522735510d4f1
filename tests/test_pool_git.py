"""``rbees-pool git ...`` on real repositories: a bare "remote", a submodule, a checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rbees_core.config import load_config
from rbees_core.errors import ConfigError, GitError
from rbees_core.pool import git

POOL = str(Path(sys.executable).with_name("rbees-pool"))


def sh(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def commit_file(repo: Path, name: str, text: str, message: str) -> str:
    (repo / name).write_text(text)
    sh(repo, "add", name)
    sh(repo, "commit", "-q", "-m", message)
    return sh(repo, "rev-parse", "HEAD")


class Lab:
    """``lib.git`` (the submodule's remote), ``remote.git`` (the pool checkout's remote),
    ``seed`` (where upstream commits are made) and ``checkout`` (the pool's clone)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        lib_work = root / "lib-work"
        lib_work.mkdir()
        sh(lib_work, "init", "-q", "-b", "main")
        self.lib_first = commit_file(lib_work, "lib.txt", "v1\n", "lib v1")
        self.lib_git = root / "lib.git"
        sh(root, "clone", "-q", "--bare", str(lib_work), str(self.lib_git))
        self.lib_work = lib_work
        self.remote = root / "remote.git"
        sh(root, "init", "-q", "--bare", "-b", "main", str(self.remote))
        self.seed = root / "seed"
        sh(root, "clone", "-q", str(self.remote), str(self.seed))
        commit_file(self.seed, "README.md", "pool\n", "first")
        sh(self.seed, "submodule", "add", "-q", str(self.lib_git), "vendor/lib")
        sh(self.seed, "commit", "-q", "-m", "add lib")
        sh(self.seed, "push", "-q", "origin", "main")
        self.checkout = root / "checkout"
        sh(root, "clone", "-q", "--recurse-submodules", str(self.remote), str(self.checkout))

    def lib_commit(self, text: str) -> str:
        new = commit_file(self.lib_work, "lib.txt", text, f"lib {text.strip()}")
        sh(self.lib_work, "push", "-q", str(self.lib_git), "main")
        return new

    def upstream_commit(self, *, bump_lib: bool = False) -> str:
        if bump_lib:
            lib = self.seed / "vendor" / "lib"
            sh(lib, "pull", "-q", "origin", "main")
            sh(self.seed, "add", "vendor/lib")
        commit_file(self.seed, "README.md", "pool v2\n", "second")
        sh(self.seed, "push", "-q", "origin", "main")
        return sh(self.seed, "rev-parse", "HEAD")


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lab:
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text("[protocol \"file\"]\n\tallow = always\n[init]\n\tdefaultBranch = main\n"
                         "[advice]\n\tdetachedHead = false\n")
    for key, value in {"GIT_CONFIG_GLOBAL": str(gitconfig), "GIT_CONFIG_NOSYSTEM": "1",
                       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
                       "HOME": str(tmp_path), "RBEES_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(key, value)
    for name in ("RBEES_CONFIG", "RBEES_POOL_CHECKOUT"):
        monkeypatch.delenv(name, raising=False)
    return Lab(tmp_path)


def pool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([POOL, "git", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def pool_json(*args: str, env: dict[str, str] | None = None) -> Any:
    done = pool(*args, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_of_a_clean_checkout(lab: Lab) -> None:
    info = git.status(lab.checkout)
    assert info["path"] == str(lab.checkout)
    assert (info["branch"], info["upstream"]) == ("main", "origin/main")
    assert (info["ahead"], info["behind"], info["dirty"]) == (0, 0, False)
    assert info["commit"] == sh(lab.checkout, "rev-parse", "HEAD")
    assert info["remotes"] == {"origin": str(lab.remote)}
    (lab.checkout / "notes.txt").write_text("scratch\n")
    (lab.checkout / "README.md").write_text("edited\n")
    info = git.status(lab.checkout / "vendor")  # any folder inside the checkout
    assert info["dirty"] is True
    assert info["changes"] == ["README.md"] and info["untracked"] == ["notes.txt"]


def test_pull_fast_forwards_and_updates_submodules(lab: Lab) -> None:
    before = sh(lab.checkout, "rev-parse", "HEAD")
    lib_new = lab.lib_commit("v2\n")
    after = lab.upstream_commit(bump_lib=True)
    result = git.pull(lab.checkout)
    assert (result["before"], result["after"], result["updated"]) == (before, after, True)
    (sub,) = result["submodules"]
    assert (sub["path"], sub["state"], sub["commit"]) == ("vendor/lib", "ok", lib_new)
    assert (lab.checkout / "vendor/lib/lib.txt").read_text() == "v2\n"
    again = git.pull(lab.checkout)
    assert again["updated"] is False and again["after"] == after


def test_pull_refuses_a_dirty_tree_and_touches_nothing(lab: Lab) -> None:
    lab.upstream_commit()
    before = sh(lab.checkout, "rev-parse", "HEAD")
    (lab.checkout / "README.md").write_text("local edit\n")
    with pytest.raises(GitError, match=r"uncommitted changes \(README\.md\)"):
        git.pull(lab.checkout)
    assert sh(lab.checkout, "rev-parse", "HEAD") == before
    assert (lab.checkout / "README.md").read_text() == "local edit\n"


def test_pull_needs_a_remote_an_upstream_and_a_branch(lab: Lab, tmp_path: Path) -> None:
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    sh(lonely, "init", "-q")
    commit_file(lonely, "a.txt", "a\n", "a")
    with pytest.raises(GitError, match="has no remote to pull from"):
        git.pull(lonely)
    sh(lab.checkout, "checkout", "-q", "-b", "topic")
    with pytest.raises(GitError, match=r"branch topic .* has no upstream"):
        git.pull(lab.checkout)
    sh(lab.checkout, "checkout", "-q", "--detach")
    with pytest.raises(GitError, match="detached HEAD"):
        git.pull(lab.checkout)


def test_not_a_checkout(tmp_path: Path, lab: Lab) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GitError, match="is not a git checkout"):
        git.status(plain)
    with pytest.raises(GitError, match="does not exist"):
        git.status(tmp_path / "absent")


def test_a_failing_git_reports_its_error_line(lab: Lab) -> None:
    with pytest.raises(GitError, match=r"^git frobnicate failed in .*: git: 'frobnicate' is not"):
        git.git(lab.checkout, "frobnicate")


def test_submodules_list_status_update(lab: Lab, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    sh(tmp_path, "clone", "-q", str(lab.remote), str(fresh))  # submodules not initialised
    (listed,) = git.submodule_list(fresh)
    assert listed == {"name": "vendor/lib", "path": "vendor/lib", "url": str(lab.lib_git),
                      "branch": None}
    (sub,) = git.submodule_status(fresh)
    assert (sub["path"], sub["state"], sub["commit"]) == ("vendor/lib", "uninitialized",
                                                          lab.lib_first)
    (sub,) = git.submodule_update(fresh)
    assert sub["state"] == "ok" and sub["url"] == str(lab.lib_git)
    tip = lab.lib_commit("v3\n")
    sh(fresh / "vendor/lib", "fetch", "-q", "origin")
    sh(fresh / "vendor/lib", "checkout", "-q", tip)
    assert git.submodule_status(fresh)[0]["state"] == "modified"
    assert git.submodule_update(fresh, ["vendor/lib"])[0]["commit"] == lab.lib_first
    (sub,) = git.submodule_update(fresh, remote=True)
    assert (sub["commit"], sub["state"]) == (tip, "modified")
    with pytest.raises(GitError, match="'vendor/nope' is not a submodule"):
        git.submodule_update(fresh, ["vendor/nope"])
    plain = tmp_path / "plain"
    sh(tmp_path, "init", "-q", str(plain))
    assert git.submodule_list(plain) == [] and git.submodule_status(plain) == []
    with pytest.raises(GitError, match="has no submodules"):
        git.submodule_update(plain)


def test_the_cli_finds_the_checkout_by_flag_env_and_config(lab: Lab, tmp_path: Path) -> None:
    by_flag = pool_json("status", "--checkout", str(lab.checkout))
    assert by_flag["branch"] == "main" and by_flag["dirty"] is False
    by_env = pool_json("status", env={"RBEES_POOL_CHECKOUT": str(lab.checkout)})
    assert by_env == by_flag
    config = tmp_path / "config.toml"
    config.write_text(f'[pool]\ncheckout = "{lab.checkout}"\n')
    assert pool_json("status", env={"RBEES_CONFIG": str(config)}) == by_flag
    text = pool("status", env={"RBEES_CONFIG": str(config)})
    assert text.returncode == 0
    assert "branch:    main at" in text.stdout and "tree:      clean" in text.stdout
    missing = pool("status")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == ("rbees-pool: error: pool.checkout: not set (set [pool] checkout "
                              "= PATH in the config file, RBEES_POOL_CHECKOUT, or pass "
                              "--checkout)\n")
    with pytest.raises(ConfigError, match=r"pool\.checkout: not set"):
        load_config().pool.checkout_path()


def test_the_cli_pulls_and_lists_submodules(lab: Lab) -> None:
    env = {"RBEES_POOL_CHECKOUT": str(lab.checkout)}
    lab.upstream_commit(bump_lib=False)
    (lab.checkout / "README.md").write_text("dirty\n")
    refused = pool("pull", env=env)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("rbees-pool: error: ") and refused.stderr.count("\n") == 1
    assert "uncommitted changes" in refused.stderr
    sh(lab.checkout, "checkout", "--", "README.md")
    pulled = pool_json("pull", env=env)
    assert pulled["updated"] is True
    assert [s["path"] for s in pool_json("submodules", "list", env=env)] == ["vendor/lib"]
    assert pool_json("submodules", "status", env=env)[0]["state"] == "ok"
    assert pool_json("submodules", "update", "vendor/lib", env=env)[0]["state"] == "ok"
    table = pool("submodules", "status", env=env)
    assert table.stdout.splitlines()[0].split() == ["PATH", "STATE", "COMMIT", "DESCRIBE", "URL"]
