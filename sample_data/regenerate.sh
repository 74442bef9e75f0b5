#!/usr/bin/env bash
# Rebuild the bundled sample files from the simulators (same seed -> same data).
set -euo pipefail
cd "$(dirname "$0")"
advcli simulate confounder -o confounder.h5ad --n 1000 --genes 100 --setting general --seed 0
advcli simulate integrate -o integrate.h5ad --n-a 700 --n-b 800 --genes 400 --cell-types 5 --seed 0
