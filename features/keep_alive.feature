@m2
Feature: Keep-alive, as Ollama's keep_alive
  A job's keep_alive says how long its worker stays loaded once idle: 0 unloads it right
  after the job, -1 keeps it; the latest job's keep_alive is the worker's.

  Background:
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation

  Scenario: keep_alive 0 unloads the worker right after its job
    When I submit a task to the orchestrator with:
      """
      {"model": "smollm2", "prompt": "Hi", "max_tokens": 4, "keep_alive": 0, "placement": {"pool": "workstation"}}
      """
    Then the job ends with "end"
    And the worker that ran it is stopped within 2 seconds of the job's end

  Scenario: keep_alive -1 keeps the worker loaded
    When I submit a task to the orchestrator with:
      """
      {"model": "smollm2", "prompt": "Hi", "max_tokens": 4, "keep_alive": -1, "placement": {"pool": "workstation"}}
      """
    Then the job ends with "end"
    And the worker that ran it is still ready after 2 seconds
