@auth
Feature: Authentication with the API token
  Daemons bound to a host address need a token of at least 16 characters; /health and
  /metrics need none.

  Background:
    Given the cluster is up: rbees-orcd on blep, pool-managerd on mac and workstation

  Scenario Outline: <daemon> answers 401 UNAUTHENTICATED without the token
    When I GET "<path>" from <daemon> with token "<token>"
    Then the answer status is 401
    And the error code is "UNAUTHENTICATED"
    And the answer has header "WWW-Authenticate" starting with "Bearer"

    Examples:
      | daemon                   | path       | token       |
      | the orchestrator         | /v2/tasks  | none        |
      | the orchestrator         | /v2/tasks  | wrong       |
      | mac's pool daemon        | /v2/state  | none        |
      | workstation's pool daemon | /v2/workers | wrong      |

  Scenario Outline: <daemon> answers with the right token
    When I GET "<path>" from <daemon> with token "right"
    Then the answer status is 200

    Examples:
      | daemon            | path      |
      | the orchestrator  | /v2/tasks |
      | mac's pool daemon | /v2/state |

  Scenario: /health needs no token
    When I GET "/health" from the orchestrator with token "none"
    Then the answer status is 200
    And the output contains "uptime_s"

  Scenario: A daemon refuses to listen on every address without a token
    When blep runs "rbees-orcd --bind 0.0.0.0:18081" without a token
    Then the command fails with exit code 1
    And stderr is one line containing "without an API token"

  Scenario: A token file readable by others is refused
    Given a token file on blep readable by others
    When blep runs "rbees-orcd --bind 0.0.0.0:18082 --api-token-file {token_file}" without a token
    Then the command fails with exit code 1
    And stderr is one line containing "chmod 600"
