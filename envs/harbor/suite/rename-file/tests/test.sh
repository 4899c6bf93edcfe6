#!/bin/bash
# Checks that /app/draft.txt now lives at /app/final.txt.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  same /app/final.txt /tests/expected.txt && [ ! -e /app/draft.txt ]
}

if check; then reward=1; else reward=0; fi
echo "rename-file: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
