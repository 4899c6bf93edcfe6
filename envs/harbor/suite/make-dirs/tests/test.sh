#!/bin/bash
# Checks that /app/project/{src,docs,tests} are directories.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  for dir in src docs tests; do
    [ -d "/app/project/$dir" ] || return 1
  done
}

if check; then reward=1; else reward=0; fi
echo "make-dirs: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
