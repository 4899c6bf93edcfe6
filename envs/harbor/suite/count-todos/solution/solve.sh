#!/bin/bash
set -e
grep -r TODO /app/src | wc -l > /app/todo_count.txt
