#!/bin/bash
# Checks /app/users.txt against the user names.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  same /app/users.txt /tests/expected.txt
}

if check; then reward=1; else reward=0; fi
echo "passwd-users: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
