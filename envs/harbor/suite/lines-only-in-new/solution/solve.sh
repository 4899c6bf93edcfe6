#!/bin/bash
set -e
comm -13 /app/old.txt /app/new.txt > /app/added.txt
