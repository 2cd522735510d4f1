@m2
Feature: Keep-alive, as Ollama's keep_alive
  A job's keep_alive says how long its worker stays loaded once idle: 0 unloads it right
  after the job, -1 keeps it; the latest job's keep_alive is the worker's. A job that gives
  none gets rbees-orcd's default, which covers every worker its pools report, also one
  started before rbees-orcd itself was restarted.

  Background:
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation

  Scenario: keep_alive 0 unloads the worker right after its job
    When I submit a task to the orchestrator with:
      """
      {"model": "smollm2", "prompt": "Hi", "max_tokens": 4, "keep_alive": 0, "placement": {"pool": "workstation"}}
      """
    Then the job ends with "end"
    And the worker that ran it is stopped within 1 second of the job's end

  Scenario: keep_alive -1 keeps the worker loaded
    When I submit a task to the orchestrator with:
      """
      {"model": "smollm2", "prompt": "Hi", "max_tokens": 4, "keep_alive": -1, "placement": {"pool": "workstation"}}
      """
    Then the job ends with "end"
    And the worker that ran it is still ready after 2 seconds

  Scenario: The default keep-alive unloads an idle worker started before rbees-orcd restarted
    When I submit a task to the orchestrator with:
      """
      {"model": "smollm2", "prompt": "Hi", "max_tokens": 4, "keep_alive": -1, "placement": {"pool": "workstation"}}
      """
    Then the job ends with "end"
    When rbees-orcd on blep is restarted with a default keep-alive of 3 seconds
    Then the worker that ran it is still ready after 2 seconds
    And the worker that ran it is stopped no sooner than 2 and within 6 seconds of the restart
