#!/bin/bash
set -e
wc -w < /app/essay.txt > /app/words.txt
