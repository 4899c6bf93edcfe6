#!/bin/bash
# Checks that /app/secret.key has mode 600 and is unchanged.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ "$(stat -c %a /app/secret.key 2>/dev/null)" = 600 ] && same /app/secret.key /tests/secret.key
}

if check; then reward=1; else reward=0; fi
echo "chmod-secret: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
