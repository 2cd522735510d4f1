@m1
Feature: M1, pool-managerd on each pool host and the HTTP transport
  Each pool host runs pool-managerd on its own address; rbees drives it over HTTP with the
  API token, and the pool heartbeats to the orchestrator on blep.

  Background:
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation

  Scenario: The pool daemon says it runs
    When mac runs "rbees-pool daemon status --format json"
    Then the command succeeds
    And the output contains "running"

  Scenario: The pools register with the orchestrator by heartbeat
    When I GET "/v2/pools" from the orchestrator
    Then the answer status is 200
    And the pools "mac" and "workstation" are "ready"

  Scenario: Pool status over the HTTP transport
    Given blep knows "mac" as host "mac-http" over HTTP
    When blep runs "rbees pool status --host mac-http --format json"
    Then the command succeeds
    And the JSON output has a "cpu" object with "cores" of at least 1

  Scenario: A worker started through the pool daemon listens on the pool's address
    When I POST to mac's pool daemon "/v2/workers/start" with:
      """
      {"model_ref": "smollm2", "backend": "llamacpp", "device": "cpu"}
      """
    Then the answer status is 202
    And the started worker becomes "ready" on "mac" within 60 seconds
    And the started worker's uri is on mac's address
    When I POST to mac's pool daemon "/v2/workers/{worker_id}/stop" with:
      """
      {}
      """
    Then the answer status is 202

  Scenario: A preflight failure spawns nothing
    When I POST to mac's pool daemon "/v2/workers/start" with:
      """
      {"model_ref": "smollm2", "backend": "no-such-backend", "device": "cpu"}
      """
    Then the answer status is 409
    And the error code is "BACKEND_UNAVAILABLE"
    And no worker of backend "no-such-backend" exists on "mac"

  Scenario: A model missing from the host is refused before anything starts
    When I POST to mac's pool daemon "/v2/workers/start" with:
      """
      {"model_ref": "pkg:no_such_model_pkg", "backend": "llamacpp", "device": "cpu"}
      """
    Then the answer status is 409
    And the error code is "MODEL_NOT_FOUND"

  Scenario: A file outside the pool's roots is refused before anything starts
    When I POST to mac's pool daemon "/v2/workers/start" with:
      """
      {"model_ref": "file:/etc/passwd", "backend": "llamacpp", "device": "cpu"}
      """
    Then the answer status is 400
    And the error code is "INVALID_PARAMS"

  Scenario: A download through the pool daemon streams progress and ends with the sha256
    Given the hub serves a 3 MB model "rbees-lab/tiny-GGUF" file "tiny.gguf"
    When I stream a download of "hf:rbees-lab/tiny-GGUF/tiny.gguf" through workstation's pool daemon
    Then the stream has "progress" events and ends with "end" carrying the hub's sha256
    When I GET "/v2/models" from workstation's pool daemon
    Then the output contains "tiny.gguf"

  Scenario: A worker killed under the pool daemon is marked failed within 5 seconds
    When I POST to workstation's pool daemon "/v2/workers/start" with:
      """
      {"model_ref": "smollm2", "backend": "llamacpp", "device": "cpu"}
      """
    Then the answer status is 202
    And the started worker becomes "ready" on "workstation" within 60 seconds
    When the started worker's process is killed
    Then the started worker is "failed" on "workstation" within 5 seconds

  Scenario: The pool daemon's state lists the host's CPU and models
    When I GET "/v2/state" from mac's pool daemon
    Then the answer status is 200
    And the output contains "cpu"
    And the output contains "ram_total_bytes"
