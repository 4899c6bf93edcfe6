#!/bin/bash
# Checks that /app/run.sh is executable and unchanged.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ -x /app/run.sh ] && same /app/run.sh /tests/run.sh
}

if check; then reward=1; else reward=0; fi
echo "make-executable: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
