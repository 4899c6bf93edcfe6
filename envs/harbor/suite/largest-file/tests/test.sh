#!/bin/bash
# Checks that /app/largest.txt holds 'b.txt'.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ "$(cat /app/largest.txt 2>/dev/null)" = b.txt ]
}

if check; then reward=1; else reward=0; fi
echo "largest-file: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
