#!/bin/bash
# Checks that /app/total.txt holds 120.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  number_in /app/total.txt 120
}

if check; then reward=1; else reward=0; fi
echo "sum-column: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
