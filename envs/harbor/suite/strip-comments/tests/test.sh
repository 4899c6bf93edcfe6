#!/bin/bash
# Checks /app/active.txt against the non-empty, non-comment lines of /app/config.txt.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  same /app/active.txt /tests/expected.txt
}

if check; then reward=1; else reward=0; fi
echo "strip-comments: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
