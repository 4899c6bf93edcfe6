#!/bin/bash
set -e
head -n 5 /app/data.txt > /app/head.txt
