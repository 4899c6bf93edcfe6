#!/bin/bash
set -e
paste -d, /app/names.txt /app/ages.txt > /app/people.csv
