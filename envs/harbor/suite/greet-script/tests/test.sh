#!/bin/bash
# Checks that /app/greet.sh greets its first argument.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ -x /app/greet.sh ] || return 1
  [ "$(timeout 5 /app/greet.sh Ada)" = "Hello, Ada!" ] || return 1
  [ "$(timeout 5 /app/greet.sh Grace)" = "Hello, Grace!" ]
}

if check; then reward=1; else reward=0; fi
echo "greet-script: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
