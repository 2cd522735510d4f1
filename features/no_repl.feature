@no_repl
Feature: The CLIs are for control and automation: never a REPL

  Scenario Outline: `<program> <command>` does not exist
    When blep runs "<program> <command>"
    Then the command fails with exit code 2
    And stderr contains "No such command"

    Examples:
      | program    | command     |
      | rbees      | chat        |
      | rbees      | repl        |
      | rbees      | interactive |
      | rbees-pool | chat        |
      | rbees-pool | repl        |
      | rbees-pool | interactive |

  Scenario Outline: `<program>` alone prints its help and never waits for input
    When blep runs "<program>" with an open terminal-less stdin
    Then the command finishes within 10 seconds
    And the command fails with exit code 2
    And it printed "Usage: <program> [OPTIONS] COMMAND"

    Examples:
      | program    |
      | rbees      |
      | rbees-pool |
