#!/bin/bash
set -e
gunzip /app/data.csv.gz
