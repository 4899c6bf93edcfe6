#!/bin/bash
set -e
tac /app/stack.txt > /app/reversed.txt
