#!/usr/bin/env bash
# Fidelity of pumice's GGUF against llama.cpp's own quantizer (llama-quantize with an importance
# matrix from the same calibration text), measured by llama.cpp itself: KL divergence of each
# quantized model's next-token distribution from the source model's, on held-out text
# (llama-perplexity --kl-divergence), with the file sizes.
#
# usage: tools/interop/llama_cpp_fidelity.sh MODEL CALIB.txt HELDOUT.txt OUT_DIR ROW...
#   ROW = NAME:LLAMA_TYPE:PUMICE_ARGS (PUMICE_ARGS: `compress` options, comma-separated), e.g.
#   q4_0:Q4_0:--method,gptq,--bits,4,--group-size,32,--grid,symmetric
# env: LLAMA_BIN (llama-imatrix, llama-quantize, llama-perplexity), PUMICE (the binary),
#      PYTHON (with gguf, safetensors, torch), CTX (256), CALIB_SAMPLES (128), CHUNKS (the
#      held-out chunks, 40).
# llama.cpp runs without weight repacking (-nr): its CPU repacked Q4_0 path segfaults on the
# 192-wide asset model. Embeddings and LM head stay in the source dtype in both files (llama-quantize
# --token-embedding-type/--output-tensor-type), so the rows compare the linear weights alone.
set -euo pipefail
model=$1 calib=$2 heldout=$3 out=$4
shift 4
here=$(cd "$(dirname "$0")" && pwd)
: "${LLAMA_BIN:?set LLAMA_BIN to the directory of llama-quantize etc.}"
PUMICE=${PUMICE:-$here/../../target/release/pumice}
PYTHON=${PYTHON:-${PUMICE_PYTHON:-$HOME/.cache/pumice-venv/bin/python}}
CTX=${CTX:-256}
CALIB_SAMPLES=${CALIB_SAMPLES:-128}
CHUNKS=${CHUNKS:-40}
mkdir -p "$out"
src_dtype=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]+'/config.json')).get('torch_dtype') or json.load(open(sys.argv[1]+'/config.json')).get('dtype') or 'float32')" "$model")
case $src_dtype in bfloat16) keep=bf16 ;; float16) keep=f16 ;; *) keep=f32 ;; esac

kld() { # MODEL.gguf [ADAPTER.gguf] -> "mean_kld ppl top1"
  local lora=()
  [ -n "${2:-}" ] && lora=(--lora "$2")
  "$LLAMA_BIN/llama-perplexity" -m "$1" "${lora[@]}" -f "$heldout" -c "$CTX" --chunks "$CHUNKS" -b "$CTX" \
    --kl-divergence-base "$out/base.kld" --kl-divergence -t 2 -nr > "$1.kld.log" 2>&1 || {
      tail -5 "$1.kld.log"; return 1; }
  local k p
  k=$(grep -E "^Mean +KLD:" "$1.kld.log" | awk '{print $3}')
  p=$(grep -E "^Mean PPL\(Q\) " "$1.kld.log" | awk '{print $4}')
  t=$(grep -E "^Same top p:" "$1.kld.log" | awk '{print $4}')
  echo "$k $p $t"
}

first=1
printf "| row | file | MiB | mean KLD | PPL | same top-1 %% |\n|---|---|---|---|---|---|\n" > "$out/table.md"
for row in "$@"; do
  IFS=: read -r name ltype pargs <<< "$row"
  IFS=, read -r -a args <<< "$pargs"
  pd="$out/pumice-$name"
  rm -rf "$pd"
  "$PUMICE" compress "$model" -o "$pd" --format gguf --calib "$calib" \
    --calib-samples "$CALIB_SAMPLES" --calib-len "$CTX" --eval-samples 0 "${args[@]}" \
    > "$pd.log" 2>&1 || { tail -3 "$pd.log"; exit 1; }
  if [ $first = 1 ]; then
    # The source model, the imatrix and the KL base, once.
    "$PYTHON" "$here/gguf_source.py" "$model" "$pd/model.gguf" "$out/source.gguf"
    "$LLAMA_BIN/llama-imatrix" -m "$out/source.gguf" -f "$calib" -c "$CTX" -b "$CTX" -t 2 -nr \
      -o "$out/imatrix.gguf" > "$out/imatrix.log" 2>&1 || { tail -5 "$out/imatrix.log"; exit 1; }
    "$LLAMA_BIN/llama-perplexity" -m "$out/source.gguf" -f "$heldout" -c "$CTX" -b "$CTX" \
      --chunks "$CHUNKS" --kl-divergence-base "$out/base.kld" -t 2 -nr > "$out/base.log" 2>&1 \
      || { tail -5 "$out/base.log"; exit 1; }
    first=0
  fi
  lf="$out/llama-$name.gguf"
  "$LLAMA_BIN/llama-quantize" --imatrix "$out/imatrix.gguf" --token-embedding-type "$keep" \
    --output-tensor-type "$keep" "$out/source.gguf" "$lf" "$ltype" 2 > "$lf.log" 2>&1 \
    || { tail -5 "$lf.log"; exit 1; }
  for f in "$pd/model.gguf" "$lf"; do
    # CALDERA: the model with its LoRA adapter, sizes together.
    ad=""
    [ "$f" = "$pd/model.gguf" ] && [ -f "$pd/adapter.gguf" ] && ad="$pd/adapter.gguf"
    read -r k p t <<< "$(kld "$f" "$ad")"
    bytes=$(stat -c %s "$f")
    [ -n "$ad" ] && bytes=$((bytes + $(stat -c %s "$ad")))
    mib=$(awk -v b="$bytes" 'BEGIN{printf "%.3f", b/1048576}')
    who=$([ "$f" = "$lf" ] && echo "llama-quantize $ltype + imatrix" || echo "pumice $name${ad:+ + adapter}")
    printf "| %s | %s | %s | %s | %s | %s |\n" "$name" "$who" "$mib" "$k" "$p" "$t" | tee -a "$out/table.md"
  done
done
