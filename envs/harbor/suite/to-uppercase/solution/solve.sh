#!/bin/bash
set -e
tr 'a-z' 'A-Z' < /app/lower.txt > /app/upper.txt
