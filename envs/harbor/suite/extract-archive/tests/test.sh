#!/bin/bash
# Checks the files extracted from /app/archive.tar.gz.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  same /app/extracted/report/summary.txt /tests/summary.txt && same /app/extracted/report/data.csv /tests/data.csv
}

if check; then reward=1; else reward=0; fi
echo "extract-archive: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
