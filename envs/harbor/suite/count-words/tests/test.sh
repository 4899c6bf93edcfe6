#!/bin/bash
# Checks that /app/words.txt holds 26, the word count of /app/essay.txt.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  number_in /app/words.txt 26
}

if check; then reward=1; else reward=0; fi
echo "count-words: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
