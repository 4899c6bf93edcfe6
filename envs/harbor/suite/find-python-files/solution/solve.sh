#!/bin/bash
set -e
find /app/src -name '*.py' | sort > /app/py_files.txt
