@leftovers
Feature: Nothing is left behind
  `rbees down` on blep stops the whole cluster: rbees-orcd, the pool daemon of each host and
  every worker, the workers of a pool daemon that died included (found through their records
  on the host, over SSH).

  Scenario: A pool daemon SIGKILLed while its worker serves leaves no process after rbees down
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation
    And the pool hosts "mac" and "workstation" are reachable over SSH from blep
    And a long job is streaming on pool "mac"
    When pool-managerd on "mac" is killed with SIGKILL
    Then the worker serving the job still runs on "mac"
    When blep runs "rbees down --grace 2"
    Then the command succeeds
    And no rbees process is left on any host
    And the job's stream has ended with a terminal event
