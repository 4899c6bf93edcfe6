#!/bin/bash
# Checks that /app/todo_count.txt holds 4.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  number_in /app/todo_count.txt 4
}

if check; then reward=1; else reward=0; fi
echo "count-todos: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
