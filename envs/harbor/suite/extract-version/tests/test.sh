#!/bin/bash
# Checks that /app/version.txt holds 2.7.1.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ "$(cat /app/version.txt 2>/dev/null)" = 2.7.1 ]
}

if check; then reward=1; else reward=0; fi
echo "extract-version: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
