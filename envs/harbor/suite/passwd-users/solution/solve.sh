#!/bin/bash
set -e
cut -d: -f1 /app/accounts.txt > /app/users.txt
