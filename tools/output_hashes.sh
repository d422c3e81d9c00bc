#!/usr/bin/env bash
# SHA-256 of model.safetensors and pumice.json for a fixed set of compressions of the asset
# model: gptq 4-bit, rtn 3-bit, caldera defaults, a --measurement allocation, a 2-shard merge.
# Run before and after a change that must not alter output bytes; compare the two listings.
#
#   tools/output_hashes.sh [OUT_DIR] > hashes.txt
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${PUMICE:-$root/target/release/pumice}"
model="$root/assets/models/gutenberg-llama"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
q=(--eval-samples 0 --force --calib-samples 32 --calib-len 256)
run() { "$bin" "$@" > /dev/null 2>> "$out/log.txt"; }
run compress "$model" -o "$out/gptq4" --method gptq --bits 4 "${q[@]}"
run compress "$model" -o "$out/rtn3" --method rtn --bits 3 "${q[@]}"
run compress "$model" -o "$out/caldera" --method caldera "${q[@]}"
rm -f "$out/measurement.json"
run importance "$model" -o "$out/measurement.json" --calib-samples 8 --calib-len 128 \
    --options gptq-3-g128,gptq-4-g128,rtn-4-g64
run compress "$model" -o "$out/allocated" --measurement "$out/measurement.json" --target-bpw 3.6 "${q[@]}"
rm -rf "$out/h" "$out/w"
run hessians "$model" -o "$out/h" --force --calib-samples 32 --calib-len 256
run compress "$model" --method gptq --bits 4 --hessians "$out/h" --work-dir "$out/w" --shard 0/2 "${q[@]}"
run compress "$model" --method gptq --bits 4 --hessians "$out/h" --work-dir "$out/w" --shard 1/2 "${q[@]}"
run merge "$out/w" -o "$out/merged" --force
for d in gptq4 rtn3 caldera allocated merged; do
  for f in model.safetensors pumice.json; do
    printf '%s  %s/%s\n' "$(sha256sum "$out/$d/$f" | cut -c1-64)" "$d" "$f"
  done
done
