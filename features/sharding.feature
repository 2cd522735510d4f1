@sharding
Feature: One model across mac and workstation over llama.cpp's RPC backend
  Pools lend a device over RPC ([pool] rpc = true): a supervised RPC server bound to
  loopback, reached from another host only through the pool's authenticated gateway. With
  memory limits under which SmolLM2 fits on neither pool alone, a worker on workstation
  holds half of its layers and mac's RPC server the other half; its greedy output is the
  unsharded one. A cut link fails the running job within 3 heartbeats with a retriable
  error, and the next job is sharded again. rbees-orcd plans a shard itself when a job's
  model fits no pool alone; two scenarios start the RPC server and the sharded worker
  through the pools' APIs instead, as it does.

  Background:
    Given the cluster is up with pools that lend over RPC and hold SmolLM2 on neither alone

  Scenario: An RPC server answers no other host but through its pool's gateway
    Given mac lends its CPU over RPC
    Then workstation cannot connect to mac's RPC server
    And workstation gets through mac's gateway with mac's token only

  Scenario: A job runs sharded across mac and workstation, its output identical to unsharded
    Given mac lends its CPU over RPC
    Then neither pool starts SmolLM2 whole
    When workstation starts a worker of SmolLM2 sharded onto mac
    And a greedy job for SmolLM2 runs on pool "workstation"
    Then its text is the unsharded text of the same prompt

  Scenario: Cutting mac's link fails the sharded job within 3 heartbeats; back, it shards again
    Given the lab's links are real (network namespaces)
    And a long job is streaming
    And the job's why names the shard over mac and workstation
    When the link of "mac" is cut
    Then the stream ends with "error" code "WORKER_FAILED" within 3 heartbeats of the cut and a margin
    And the error is retriable
    When the link of "mac" is restored
    And a greedy job for SmolLM2 runs on no pool in particular
    Then its text is the unsharded text of the same prompt
    And the job's why names the shard over mac and workstation

  Scenario: rbees-orcd shards a model that fits no pool alone, and says so in why
    When a greedy job for SmolLM2 runs on no pool in particular
    Then its text is the unsharded text of the same prompt
    And the job's why names the shard over mac and workstation
