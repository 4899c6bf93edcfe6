#!/bin/bash
set -e
tr '\t' ',' < /app/data.tsv > /app/data.csv
