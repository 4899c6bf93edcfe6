#!/bin/bash
set -e
awk '$2 >= 50' /app/scores.txt > /app/passed.txt
