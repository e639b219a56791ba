#!/usr/bin/env bash
# Run CMD ARGS... under QEMU user-mode emulation with an AVX2-only x86-64 CPU
# (Haswell: AVX, AVX2, FMA, F16C, BMI1/2; no AVX-512, no VNNI, no AVX-VNNI).
# u8 x s8 int8 dot products in fbgemm/oneDNN/MLAS then take the AVX2 path
# (vpmaddubsw, whose pairwise int16 sums saturate).
#
#   benchmarks/run_avx2.sh .venv/bin/python -m pytest -q tests/test_quant_targets.py   (an AVX2-only CI run, emulated)
#
# Env:  AVX2_QEMU_CPU  override the CPU model (default below)
#       AVX2_QEMU      qemu binary (default qemu-x86_64; apt-get install -y qemu-user)
# Caveat: without binfmt_misc, processes the command itself exec()s
# (subprocess, multiprocessing 'spawn', os.exec*) run NATIVELY, not emulated.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 CMD [ARGS...]" >&2; exit 2; fi
QEMU=${AVX2_QEMU:-qemu-x86_64}
# Haswell without TSX and the system-level features TCG can't provide
# (listing them explicitly silences QEMU's "TCG doesn't support" warnings).
CPU=${AVX2_QEMU_CPU:-Haswell-noTSX,-pcid,-x2apic,-tsc-deadline,-invpcid}
command -v "$QEMU" >/dev/null || { echo "$0: $QEMU not found (apt-get install -y qemu-user)" >&2; exit 127; }

prog=$1; shift
if [[ $prog != */* ]]; then
  p=$(command -v -- "$prog") || { echo "$0: $prog: command not found" >&2; exit 127; }
  prog=$p
fi
# qemu-user loads ELF files only: resolve a "#!" script to its interpreter.
args=()
for _ in 1 2 3 4; do
  if [ -f "$prog" ] && [ "$(head -c2 -- "$prog")" = '#!' ]; then
    read -r shebang < "$prog"
    shebang=${shebang#\#!}
    read -r interp iarg <<<"$shebang"
    new=("$interp"); [ -n "${iarg:-}" ] && new+=("$iarg")
    args=("${new[@]:1}" "$prog" "${args[@]}")
    prog=$interp
    if [[ $prog != */* ]]; then prog=$(command -v -- "$prog"); fi
  else
    break
  fi
done
# /usr/bin/env INTERP: resolve INTERP on PATH so it too is emulated.
if [ "$(basename -- "$prog")" = env ] && [ ${#args[@]} -gt 0 ] && [[ ${args[0]} != -* ]]; then
  prog=$(command -v -- "${args[0]}"); args=("${args[@]:1}")
fi
exec "$QEMU" -cpu "$CPU" "$prog" "${args[@]}" "$@"
