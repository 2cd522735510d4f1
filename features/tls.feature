@tls
Feature: TLS on every hop
  The lab's CA on blep (rbees tls issue) signs a certificate for each host's address.
  rbees-orcd on blep and pool-managerd on mac and workstation serve HTTPS with them, the
  pools start their workers with the same certificate, and every client verifies.

  Background:
    Given the cluster is up over TLS: rbees-orcd on blep, pool-managerd on mac and workstation

  Scenario: Jobs run on both pools over HTTPS, and every URL the orchestrator holds is https
    When 2 jobs pinned to pool "mac" are submitted
    Then every job ends with "end" on pool "mac"
    When 2 jobs pinned to pool "workstation" are submitted
    Then every job ends with "end" on pool "workstation"
    And every pool and worker the orchestrator knows has an https URL
    When blep runs "rbees jobs list --format json"
    Then the command succeeds

  Scenario: A client with the wrong CA fails with a clear one-line error
    Given a CA file on blep that signed none of the lab's certificates
    When blep runs "rbees --ca-file {other_ca} jobs list"
    Then the command fails with exit code 1
    And stderr is one line containing "its TLS certificate is not trusted here"
    When blep runs "rbees keys list" with RBEES_CA_FILE set to it
    Then the command fails with exit code 1
    And stderr is one line containing "give the CA that signed it with --ca-file"
