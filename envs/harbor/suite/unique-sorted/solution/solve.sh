#!/bin/bash
set -e
sort -u /app/emails.txt > /app/unique.txt
