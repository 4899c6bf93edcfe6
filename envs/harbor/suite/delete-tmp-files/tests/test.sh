#!/bin/bash
# Checks that no .tmp file is left under /app/work and the other files survived.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ -z "$(find /app/work -name '*.tmp')" ] || return 1
  same /app/work/keep.txt /tests/keep.txt && same /app/work/sub/notes.md /tests/notes.md
}

if check; then reward=1; else reward=0; fi
echo "delete-tmp-files: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
