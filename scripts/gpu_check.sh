#!/usr/bin/env bash
# The GPU check of README "Large models on one GPU": one prepared command, about 8 minutes on one H100/H200
# (make gpu-check; every step has a timeout, 11.5 minutes in all: where one call may run 10 minutes, run STEPS=1,4
# and STEPS=2,3 as two calls).
#
#   1. the GPU tests of the suite (pytest -m gpu): CUDA vs CPU layer errors, offload on CUDA (identical bytes, lower
#      peak); and the QuantEase tests of the Triton column loop (solvers/cd_triton.py), compiled, on CUDA tensors
#   2. the default model, W4 QuantEase, 16 x 512 PTB calibration, on the CPU (float32 forwards, the CPU default) and
#      on the GPU (bfloat16 forwards); perplexity of both on PTB and wiki (8 windows of 2048 tokens), evaluated on the
#      GPU; the GPU checkpoint must be within 0.5% of the CPU one on each dataset
#   3. bench_scale on the GPU: Llama-3-8B shapes, 2 blocks, 128 x 2048 calibration tokens; per block the time split and
#      peak GPU memory (torch.cuda.max_memory_allocated), plan vs measured, extrapolation to 32 blocks
#   4. bench_solvers' speed table at Llama-3-8B's layer shapes (4096x4096, 14336x4096, 4096x14336) on the GPU: one CD
#      sweep with the Triton loop and with the plain loop against one matmul of the same shape (time and GFLOP/s),
#      the default solve against GPTQ's
#
# Everything lands in $OUT (default runs/gpu-check); the summary is $OUT/gpu_check.json. Exit 1 if a check fails.
# A dry run of steps 2 and 4 and the summary on a machine without a GPU:
#   DEVICE=cpu STEPS=2,4 SHAPES=960x576,576x1536 SLOW=10 scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-runs/gpu-check}
TOL=${TOL:-0.005}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-1,2,3,4}
SHAPES=${SHAPES:-4096x4096,14336x4096,4096x14336}
SLOW=${SLOW:-1}  # multiplies every timeout (a dry run on a slow CPU)
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ $DEVICE == cuda* ]]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
  $PY -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
fi
start=$(date +%s)
stamp() { echo "gpu_check: [$(( $(date +%s) - start )) s] $*"; }
step() { [[ ",$STEPS," == *",$1,"* ]]; }

if step 1; then
  stamp "1/4 GPU tests"
  timeout $(( 60 * SLOW )) $PY -m pytest -q -m gpu tests/test_scale.py tests/test_robustness.py
  timeout $(( 60 * SLOW )) $PY -m pytest -q tests/test_quantease.py -k "triton or cuda"  # the Triton loop, compiled
fi

if step 2; then
  stamp "2/4 default model W4 QuantEase: CPU float32 vs $DEVICE bfloat16"
  common=(smollm2-135m --bits 4 --nsamples 16 --seqlen 512 --calib ptb --quiet --overwrite)
  timeout $(( 120 * SLOW )) $PY -m quantease.cli quantize "${common[@]}" --out "$OUT/w4-cpu" --device cpu --dtype float32
  timeout $(( 45 * SLOW )) $PY -m quantease.cli quantize "${common[@]}" --out "$OUT/w4-gpu" --device "$DEVICE" --dtype bfloat16
  timeout $(( 45 * SLOW )) $PY -m quantease.cli eval "$OUT/w4-cpu" "$OUT/w4-gpu" --ppl ptb,wiki --limit 8 --device "$DEVICE" \
    --quiet --json "$OUT/ppl.json"
fi

if step 3; then
  stamp "3/4 bench_scale on $DEVICE (Llama-3-8B shapes, 2 blocks, 128 x 2048 tokens)"
  timeout $(( 210 * SLOW )) $PY scripts/bench_scale.py --blocks 2 --nsamples 128 --seqlen 2048 --device "$DEVICE" \
    --out "$OUT/bench-scale" | tee "$OUT/bench-scale.md"
fi

if step 4; then
  stamp "4/4 CD sweep vs matmul on $DEVICE ($SHAPES)"
  timeout $(( 150 * SLOW )) $PY scripts/bench_solvers.py --shapes "$SHAPES" --device "$DEVICE" \
    --json "$OUT/bench-solvers.json" | tee "$OUT/bench-solvers.md"
fi

stamp "summary"
$PY - "$OUT" "$TOL" <<'EOF'
import json, sys
from pathlib import Path

out, tol = Path(sys.argv[1]), float(sys.argv[2])
summary, rows = {}, {}  # whatever steps have run into OUT (a split run's second call sums up both)
if (out / "ppl.json").exists():
    ppl = json.loads((out / "ppl.json").read_text())
    cpu, gpu = ({r["dataset"]: r["ppl"] for r in ppl[str(out / f"w4-{d}")]} for d in ("cpu", "gpu"))
    rows = {d: {"cpu_float32": cpu[d], "gpu_bfloat16": gpu[d], "rel_diff": gpu[d] / cpu[d] - 1} for d in cpu}
    summary["ppl"] = rows
bench = out / "bench-scale" / "bench-scale.json"
if bench.exists():
    b = json.loads(bench.read_text())
    blocks = [{k: r[k] for k in ("block", "forward_s", "sigma_s", "solve_s", "passes", "peak_device", "peak_rss")}
              for r in b["blocks"]]
    summary["bench_scale"] = {"blocks": blocks, "pairs": b["pairs"], "extrapolated": b["extrapolated"]}
solvers = out / "bench-solvers.json"
if solvers.exists():
    summary["solver_speed"] = [{k: r[k] for k in ("shape", "matmul_ms", "sweep_ms", "sweep_x", "plain_ms", "plain_x",
                                                  "cd_gflops", "matmul_gflops", "default_x", "refit0_x")}
                               for r in json.loads(solvers.read_text())["speed"]]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
if rows:
    print("| dataset | CPU float32 | GPU (or DEVICE) bfloat16 | difference |\n|---|---|---|---|")
for d, r in rows.items():
    print(f"| {d} | {r['cpu_float32']:.3f} | {r['gpu_bfloat16']:.3f} | {100 * r['rel_diff']:+.2f}% |")
bad = [d for d, r in rows.items() if abs(r["rel_diff"]) > tol]
print(f"wrote {out / 'gpu_check.json'}")
sys.exit(f"gpu_check: GPU perplexity differs from the CPU's by more than {tol:.1%} on {', '.join(bad)}" if bad else 0)
EOF
stamp "done"
