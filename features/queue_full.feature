@m2 @queue
Feature: A full queue answers with its policy
  An orchestrator on blep with capacity 2 and no pool keeps jobs queued; the next one meets
  the policy.

  Scenario: Policy reject: 429 QUEUE_FULL with Retry-After
    Given a second orchestrator on blep with queue capacity 2 and policy "reject"
    When 3 batch jobs are submitted to it
    Then the first 2 are accepted
    And the 3rd is refused with 429 "QUEUE_FULL" and a Retry-After

  Scenario: Policy drop-oldest-batch: the oldest batch job ends with QUEUE_FULL_DROPPED
    Given a second orchestrator on blep with queue capacity 2 and policy "drop-oldest-batch"
    When 3 batch jobs are submitted to it
    Then all 3 are accepted
    And the 1st ends with "error" code "QUEUE_FULL_DROPPED"
