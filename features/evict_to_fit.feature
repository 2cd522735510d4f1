@m2 @evict
Feature: Evict to fit, by one memory figure
  A pool offers its workers at most its [pool] memory_limit and sizes each model as its
  preflight does; when a model does not fit, rbees-orcd stops idle workers least recently
  used first, records each stop in the decision that caused it, and never stops a worker
  with a job running.

  Background:
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation
    And workstation's pool offers memory for two SmolLM2 workers and holds models alpha, beta and gamma

  Scenario: The least recently used idle worker makes room for a third model; a busy one never does
    When a job for model alpha runs to its end
    And a job for model beta runs to its end
    And a job for model gamma runs to its end
    Then its decision stopped the worker of alpha as the least recently used
    And workstation has workers for beta and gamma only
    When a long job for model beta is running
    And a job for model alpha runs to its end
    Then its decision stopped the worker of gamma as the least recently used
    And the long job ends with "end" on the worker of beta it started on
    And workstation has workers for alpha and beta only
