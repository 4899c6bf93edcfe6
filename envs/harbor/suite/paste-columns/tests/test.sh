#!/bin/bash
# Checks /app/people.csv against the combined name,age lines.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  same /app/people.csv /tests/expected.csv
}

if check; then reward=1; else reward=0; fi
echo "paste-columns: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
