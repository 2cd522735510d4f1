@m2
Feature: M2, jobs through rbees-orcd on blep
  Jobs are submitted to the orchestrator, queued durably, placed on a pool, streamed back.

  Background:
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation

  Scenario: A job streams its tokens to the terminal
    When blep runs "rbees jobs submit --model smollm2 --prompt 'Write one sentence about bees.' --max-tokens 16 --temperature 0 --seed 1"
    Then the command succeeds
    And stdout is not empty
    And stderr contains "tokens"

  Scenario: The end record as JSON
    When blep runs "rbees jobs submit --model smollm2 --prompt 'Hello' --max-tokens 8 --format json"
    Then the command succeeds
    And the JSON output has "tokens_out" of at most 8

  Scenario: The same seed gives the same text
    When blep runs "rbees jobs submit --model smollm2 --prompt 'Name a flower.' --max-tokens 12 --temperature 0.9 --seed 7" twice
    Then both runs printed the same text

  Scenario: A stop sequence ends the text before it
    When blep runs "rbees jobs submit --model smollm2 --raw --prompt '1, 2, 3, 4, 5,' --max-tokens 40 --temperature 0 --stop ' 9'"
    Then the command succeeds
    And stdout contains "8"
    And stdout does not contain "9"

  Scenario: A model no pool holds is downloaded on first use, once for two jobs
    Given the hub serves the SmolLM2 file as "rbees-bdd/SmolLM2-GGUF" file "smol.Q4_1.gguf"
    And the hub sends files slowly
    When 2 tasks for "hf:rbees-bdd/SmolLM2-GGUF/smol.Q4_1.gguf" are submitted at once
    Then while it downloads, "rbees jobs why" of the first job says "downloading hf:rbees-bdd/SmolLM2-GGUF/smol.Q4_1.gguf to pool" and how far
    And each job streams "downloading" events, then tokens, and ends with "end"
    And the hub sent the file once
    When another task for "hf:rbees-bdd/SmolLM2-GGUF/smol.Q4_1.gguf" is submitted
    Then it streams tokens and ends with "end", without a "downloading" event
    And the hub sent the file once

  Scenario: An OpenAI stream for a model no pool holds tells the download's progress, then streams
    Given the hub serves the SmolLM2 file as "rbees-bdd/SmolLM2-GGUF" file "smol-openai.Q4_1.gguf"
    And the hub sends files slowly
    When an OpenAI chat stream for "hf:rbees-bdd/SmolLM2-GGUF/smol-openai.Q4_1.gguf" is read to its end
    Then it carries ": downloading hf:rbees-bdd/SmolLM2-GGUF/smol-openai.Q4_1.gguf to pool" comments, then text, then "data: [DONE]"
    And the hub sent the file once

  Scenario: A model whose download fails ends the jobs waiting for it, retriable
    Given the hub serves the SmolLM2 file as "rbees-bdd/SmolLM2-GGUF" file "smol.Q4_1.gguf"
    When I submit a task to the orchestrator with:
      """
      {"model": "hf:rbees-bdd/SmolLM2-GGUF/missing.Q4_1.gguf", "prompt": "Hi", "max_tokens": 4}
      """
    Then the job ends with a retriable "error" code "MODEL_DOWNLOAD_FAILED"
    And its error says "missing.Q4_1.gguf"

  Scenario: A job placed on the pool it asks for
    When I submit a task to the orchestrator with:
      """
      {"model": "smollm2", "prompt": "Hi", "max_tokens": 4, "placement": {"pool": "workstation"}}
      """
    Then the job ends with "end"
    And the job ran on pool "workstation"

  Scenario: Cancel mid-stream: no token after the cancel
    Given a long job is streaming
    When blep runs "rbees jobs cancel {job_id}"
    Then the command succeeds
    And the stream ends with "error" code "CANCELLED" and no token after the cancel

  Scenario: A finished job replays from Last-Event-ID without duplicates
    When I submit a task to the orchestrator with:
      """
      {"model": "smollm2", "prompt": "Count: 1, 2,", "max_tokens": 6, "temperature": 0}
      """
    Then the job ends with "end"
    And replaying its events after event 2 starts at event 3 with no duplicates

  Scenario: jobs list, status and why
    When I submit a task to the orchestrator with:
      """
      {"model": "smollm2", "prompt": "Hi", "max_tokens": 4}
      """
    Then the job ends with "end"
    When blep runs "rbees jobs list --format json"
    Then the command succeeds
    And the output contains the job id
    When blep runs "rbees jobs status {job_id} --format json"
    Then the command succeeds
    And the JSON output has "status" equal to "completed"
    When blep runs "rbees jobs why {job_id}"
    Then the command succeeds
    And stdout is not empty

  Scenario: A pool whose link is cut goes unavailable, its jobs go elsewhere, and it comes back
    Given the link of "mac" is cut
    Then the pool "mac" is "unavailable" within 3 heartbeats and a margin
    When 3 batch jobs preferring pool "mac" are submitted
    Then every job ends with "end" on pool "workstation"
    When the link of "mac" is restored
    Then the pool "mac" is "ready" within 10 seconds

  Scenario: A worker killed mid-stream fails that job with WORKER_FAILED within 5 seconds
    Given a long job is streaming
    When the worker running it is killed
    Then the stream ends with "error" code "WORKER_FAILED" within 5 seconds of the kill
    When I submit a task to the orchestrator with:
      """
      {"model": "smollm2", "prompt": "Hi", "max_tokens": 4}
      """
    Then the job ends with "end"

  Scenario: An orchestrator killed and restarted finishes every queued job exactly once
    When 20 batch jobs are submitted
    And rbees-orcd on blep is killed with SIGKILL and started again
    Then every job reaches exactly one terminal event
    # one per slot that was generating at the kill: the worker batches [placement] cpu_slots = 4
    And at most 4 jobs failed with "ORCHESTRATOR_RESTARTED"

  Scenario: An OpenAI batch survives a SIGKILL of rbees-orcd halfway, each line answered once
    When the openai client submits a batch of 200 chat lines
    And half of its lines are answered
    And rbees-orcd on blep is killed with SIGKILL and started again
    Then the batch completes with every custom_id answered once, in order

  Scenario: Prometheus metrics of the orchestrator
    When I GET "/metrics" from the orchestrator without a token
    Then the answer status is 200
    And the output contains "rbees_queue_depth"
    And the output contains "rbees_pools"

  Scenario: OpenAI chat completion with the official client
    When the openai client asks the orchestrator for a chat completion of "Say hi."
    Then the completion has text and usage

  Scenario: OpenAI streaming with usage in the last chunk
    When the openai client streams a chat completion of "Say hi." with include_usage
    Then the chunks carry text and the last one carries usage

  Scenario: OpenAI model list
    When the openai client lists the models
    Then "smollm2" is among them

  Scenario: An OpenAI request for an unknown model is an OpenAI-shaped error
    When the openai client asks for a chat completion with model "no-such-model"
    Then the client raises an error with status 404
