@recovery
Feature: Failure handling: crashed workers restarted with backoff, lost pools' jobs ended
  A worker that crashes while jobs wait for its model is started again at once; one that
  keeps crashing right after it got ready is restarted after 1, 2, 4 s... (rbees-orcd's
  metrics and `rbees jobs why` say so). A pool whose heartbeats stop fails its running jobs
  with a retriable error within 3 heartbeat intervals.

  Background:
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation

  Scenario: A SIGKILLed worker with queued demand is back within 2 seconds
    Given a long job is streaming on pool "mac"
    And the worker running it has been ready for 10 seconds
    When the worker running it is killed
    And a job for pool "mac" is submitted at once
    Then the stream ends with "error" code "WORKER_FAILED" within 5 seconds of the kill
    And that job streams its first token within 2 seconds of the kill

  Scenario: A pool whose link is cut fails its running jobs within 3 heartbeats
    Given a long job is streaming on pool "mac"
    When the link of "mac" is cut
    Then the stream ends with "error" code "WORKER_FAILED" within 3 heartbeats of the cut and a margin
    And the error is retriable
    When the link of "mac" is restored
    Then the pool "mac" is "ready" within 10 seconds

  Scenario: A worker that keeps crashing right after it got ready is restarted with backoff
    Given 16 long jobs for pool "workstation" are queued
    When the worker of "smollm2" on "workstation" is killed each time it is ready, 4 times
    Then the decision of a queued job says the restart is backed off
    And the orchestrator's metrics show the crashes and the backoff
    And the queued jobs are cancelled
    And the restarts were held 0, 1, 2 and 4 seconds after the crashes
