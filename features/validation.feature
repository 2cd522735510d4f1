@validation
Feature: Bad input gets a clear error in the contract's envelope and loses nothing

  Background:
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation

  Scenario Outline: A task with a bad <field> is refused with INVALID_PARAMS naming it
    When I POST to the orchestrator "/v2/tasks" with:
      """
      <body>
      """
    Then the answer status is 400
    And the error code is "INVALID_PARAMS"
    And the error names the field "<field>"
    And the answer keeps the envelope with a correlation id

    Examples:
      | field       | body                                                               |
      | model       | {"prompt": "hi", "max_tokens": 4}                                  |
      | max_tokens  | {"model": "smollm2", "prompt": "hi", "max_tokens": 0}              |
      | temperature | {"model": "smollm2", "prompt": "hi", "temperature": 5}             |
      | priority    | {"model": "smollm2", "prompt": "hi", "priority": "urgent"}         |
      | stop        | {"model": "smollm2", "prompt": "hi", "stop": ["a","b","c","d","e"]} |
      | surprise    | {"model": "smollm2", "prompt": "hi", "surprise": true}             |

  Scenario: A body that is not JSON is refused
    When I POST raw bytes "{not json" to the orchestrator "/v2/tasks"
    Then the answer status is 400
    And the error code is "INVALID_PARAMS"

  Scenario: An unknown job is 404 in the envelope
    When I GET "/v2/tasks/no-such-job" from the orchestrator
    Then the answer status is 404
    And the error code is "JOB_NOT_FOUND"

  Scenario: A refused task loses nothing already queued
    Given the orchestrator's job count is noted
    When I POST to the orchestrator "/v2/tasks" with:
      """
      {"model": "smollm2", "prompt": "hi", "max_tokens": -1}
      """
    Then the answer status is 400
    And the orchestrator's job count is unchanged

  Scenario: A CLI usage error exits 2
    When blep runs "rbees jobs submit --model smollm2 --prompt hi --max-tokens 0"
    Then the command fails with exit code 2

  Scenario: A pool command with a model that does not exist is one error line and exit 1
    When mac runs "rbees-pool worker spawn cpu --model no-such-model"
    Then the command fails with exit code 1
    And stderr is one line containing "no-such-model"

  Scenario: A host destination that is not one is refused
    When blep runs "rbees hosts add bad 'user@host;rm -rf /'"
    Then the command fails with exit code 1
    And stderr is one line containing "destination"
