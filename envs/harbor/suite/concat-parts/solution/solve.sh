#!/bin/bash
set -e
cat /app/parts/part1.txt /app/parts/part2.txt /app/parts/part3.txt > /app/whole.txt
