#!/bin/bash
# Checks that /app/current is a symlink resolving to /app/releases/v2.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ -L /app/current ] && [ "$(readlink -f /app/current)" = /app/releases/v2 ]
}

if check; then reward=1; else reward=0; fi
echo "create-symlink: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
