#!/bin/bash
# Checks /app/.env against the two expected lines.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  same /app/.env /tests/expected.env
}

if check; then reward=1; else reward=0; fi
echo "write-env-file: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
