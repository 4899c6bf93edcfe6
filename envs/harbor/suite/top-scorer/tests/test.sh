#!/bin/bash
# Checks that /app/top.txt holds 'erik'.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ "$(cat /app/top.txt 2>/dev/null)" = erik ]
}

if check; then reward=1; else reward=0; fi
echo "top-scorer: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
