#!/bin/bash
# Checks that /app/size.txt holds 47.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  number_in /app/size.txt 47
}

if check; then reward=1; else reward=0; fi
echo "byte-count: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
