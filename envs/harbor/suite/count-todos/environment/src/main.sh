#!/bin/bash
# TODO: parse flags
echo main
# TODO: add logging
