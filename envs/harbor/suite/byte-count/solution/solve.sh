#!/bin/bash
set -e
wc -c < /app/message.txt > /app/size.txt
