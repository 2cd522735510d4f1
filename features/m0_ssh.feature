@m0
Feature: M0, the CLI drives pool hosts over SSH with no daemon
  From blep, `rbees pool ... --host NAME` runs `rbees-pool` on the pool host over SSH,
  and `rbees jobs submit --host NAME` schedules a job there itself.

  Background:
    Given the pool hosts "mac" and "workstation" are reachable over SSH from blep

  Scenario: The status of a pool host, over SSH
    When blep runs "rbees pool status --host mac --format json"
    Then the command succeeds
    And the JSON output has a "cpu" object with "cores" of at least 1

  Scenario: The status of every pool host at once
    When blep runs "rbees pool status --host all --format json"
    Then the command succeeds
    And the output names the hosts "mac" and "workstation"

  Scenario: A model downloaded from the hub onto a pool host
    Given the hub serves a 3 MB model "rbees-lab/tiny-GGUF" file "tiny.gguf"
    When blep runs "rbees pool models download hf:rbees-lab/tiny-GGUF/tiny.gguf --host mac --format json"
    Then the command succeeds
    And the file "tiny.gguf" on "mac" has the hub's sha256
    When blep runs "rbees pool models verify hf:rbees-lab/tiny-GGUF/tiny.gguf --host mac --format json"
    Then the command succeeds

  Scenario: A worker spawned, listed and stopped on a pool host
    When blep runs "rbees pool worker spawn cpu --model smollm2 --host workstation --format json"
    Then the command succeeds
    And the spawned worker is ready
    When blep runs "rbees pool worker list --host workstation --format json"
    Then the command succeeds
    And the spawned worker is listed as "ready"
    When blep stops the spawned worker on "workstation"
    Then the spawned worker is gone from "workstation"

  Scenario: git pull on a pool host
    Given "workstation" has a git checkout one commit behind its remote
    When blep runs "rbees pool git pull --host workstation --format json"
    Then the command succeeds
    And the checkout on "workstation" is at the remote's commit

  Scenario: git pull refuses a dirty checkout
    Given "workstation" has a git checkout one commit behind its remote
    And the checkout on "workstation" has an uncommitted change
    When blep runs "rbees pool git pull --host workstation"
    Then the command fails with exit code 1
    And stderr is one line containing "uncommitted"

  Scenario: The submodules of a pool host's checkout
    Given "workstation" has a git checkout one commit behind its remote
    When blep runs "rbees pool git submodules list --host workstation --format json"
    Then the command succeeds
    And the output contains "vendor/lib"

  Scenario: An unknown host is one clear error
    When blep runs "rbees pool status --host nowhere"
    Then the command fails with exit code 1
    And stderr is one line containing "no host named 'nowhere'"

  Scenario: A host whose link is down is one clear error, and answers again when it is back
    Given the link of "mac" is cut
    When blep runs "rbees pool status --host mac"
    Then the command fails with exit code 1
    And stderr is one line containing "mac"
    When the link of "mac" is restored
    And blep runs "rbees pool status --host mac --format json"
    Then the command succeeds

  Scenario: A job scheduled by the CLI itself on a pool host, over SSH
    When blep runs "rbees jobs submit --host mac --once --model smollm2 --prompt 'Say hello.' --max-tokens 8 --temperature 0"
    Then the command succeeds
    And stdout is not empty
    And stderr contains "tokens"
