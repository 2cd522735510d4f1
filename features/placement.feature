Feature: A model larger than one GPU is split or offloaded in part, and why says so
  When no GPU has the whole model free, the built-in policies split it across the GPUs of
  one host (llama.cpp's tensor_split, in proportion to free memory) or put the layers that
  fit on one GPU and the rest in RAM (n_gpu_layers), before the CPU alone; binpack offloads
  part first. The decision and its explanation say which.

  Scenario: A 33.5 GiB model on a 24 GB + 12 GB host is split across both GPUs
    Given a scheduling snapshot on blep of a host with a 24 GB and a 12 GB GPU and a 33.5 GiB model of 80 layers
    When blep runs "rbees scheduler simulate least-loaded --snapshot {snapshot} --jobs {jobs} --format json"
    Then the command succeeds
    And stdout contains "start a worker for big on cuda:0 of pool host (split cuda:0 0.67, cuda:1 0.33)"

  Scenario: binpack keeps the second GPU free: part of the layers on one GPU, the rest in RAM
    Given a scheduling snapshot on blep of a host with a 24 GB and a 12 GB GPU and a 33.5 GiB model of 80 layers
    When blep runs "rbees scheduler simulate binpack --snapshot {snapshot} --jobs {jobs} --format json"
    Then the command succeeds
    And stdout contains "29 of 80 layers on cuda:1, rest on CPU"

  Scenario: A 9 GiB model on an 8 GB GPU runs with the layers that fit on it
    Given a scheduling snapshot on blep of a host with an 8 GB GPU and a 9 GiB model of 32 layers
    When blep runs "rbees scheduler simulate least-loaded --snapshot {snapshot} --jobs {jobs} --format json"
    Then the command succeeds
    And stdout contains "29 of 32 layers on cuda:0, rest on CPU"
    And stdout contains "(29 layers on cuda:0, rest on CPU)"

  Scenario: A host without a GPU runs the model whole in RAM, or says it never can
    Given a scheduling snapshot on blep of a host with no GPU and a 9 GiB model of 32 layers
    When blep runs "rbees scheduler simulate least-loaded --snapshot {snapshot} --jobs {jobs} --format json"
    Then the command succeeds
    And stdout contains "start a worker for big on cpu of pool host."
    Given a scheduling snapshot on blep of a host with no GPU and a 33.5 GiB model of 80 layers
    When blep runs "rbees scheduler simulate least-loaded --snapshot {snapshot} --jobs {jobs} --format json"
    Then the command succeeds
    And stdout contains "has 16.0 GiB free, needs 33.5 GiB"
