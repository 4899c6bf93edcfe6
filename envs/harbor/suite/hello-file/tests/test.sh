#!/bin/bash
# Checks that /app/hello.txt holds the line 'Hello, world!'.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ "$(cat /app/hello.txt 2>/dev/null)" = "Hello, world!" ]
}

if check; then reward=1; else reward=0; fi
echo "hello-file: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
