#!/usr/bin/env bash
# The GPU checklist (../shared/docs/gpu.md) on a CUDA machine, from the repository root, one step or several:
#
#   bench/gpu_suite.sh [correctness] [paged] [dtype] [profile] [medium] [small] [memory] [sampling] [stream]
#   (none: all nine)
#
#   correctness  pytest -m gpu, then the PEFT parity tests with --device cuda (engine, runner process, server;
#                float32)
#   paged        --kv-layout paged on CUDA: its CUDA-graph capture and replay and its prefix blocks (pytest
#                --device cuda), then bench.kv_capacity (paged beside slots, same budget)
#   dtype        bench.dtype_drift: bfloat16/float16 greedy tokens vs float32 on the demo backbone + prefixes
#   profile      bench.profile_step: torch.profiler over decode steps, GPT-2-medium shape, batch 64
#   medium       bench.throughput, GPT-2-medium shape, 64 prefixes, 128 requests (vs PEFT, vs HF batched)
#   small        bench.throughput, GPT-2-small shape, 256 concurrent requests
#   memory       bench.kv_fit: sequences of 1024 positions next to gpt2-large (float32) / gpt2-xl (bfloat16)
#   sampling     bench.sampling: greedy / sampled / sampled+streamed / top-p only over HTTP, GPT-2 4x256 and small;
#                then the same with --runner-process beside one process
#   stream       bench.stream_interval: servers at --stream-interval 1 and 4 side by side, GPT-2 4x256 and small
#
# Each step's output goes to $OUT/<step>.log (OUT defaults to var/gpu) and the last lines to the terminal;
# bench.throughput's records (bench/results/gpu-*.json) are copied there too. PYTHON picks the interpreter
# (default python3: the one with torch+CUDA); the server's own dependencies must be importable by it.
set -uo pipefail
out=${OUT:-var/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(correctness paged dtype profile medium small memory sampling stream)

medium=(--layers 24 --width 1024 --heads 16 --vocab 50257)
small=(--layers 12 --width 768 --heads 12 --vocab 50257)

run_step() {
    case $1 in
    correctness)
        $py -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py &&
            $py -m pytest -q -p no:cacheprovider --device cuda tests/engine/test_engine_exactness.py \
                tests/engine/test_cuda_graphs.py tests/engine/test_runner_process.py \
                tests/integration/test_serve_exact.py ;;
    paged)
        $py -m pytest -q -p no:cacheprovider --device cuda tests/engine/test_paged_cuda_graphs.py \
            tests/engine/test_paged_prefixes.py tests/engine/test_paged_kv.py tests/engine/test_paged_runner_process.py &&
            $py -m bench.kv_capacity --device cuda --requests 128 --repeats 2 ;;
    dtype) $py -m bench.dtype_drift --device cuda ;;
    profile) $py -m bench.profile_step --device cuda "${medium[@]}" --batch 64 ;;
    medium)
        $py -m bench.throughput --device cuda "${medium[@]}" --prefixes 64 --requests 128 --peft-requests 32 \
            --repeats 3 --name gpu-medium && cp bench/results/gpu-medium.json "$out/" ;;
    small)
        $py -m bench.throughput --device cuda "${small[@]}" --prefixes 64 --requests 256 --peft-requests 32 \
            --repeats 3 --name gpu-small && cp bench/results/gpu-small.json "$out/" ;;
    memory) $py -m bench.kv_fit --device cuda ;;
    sampling)
        $py -m bench.sampling --device cuda --repeats 2 --no-record &&
            $py -m bench.sampling --device cuda "${small[@]}" --repeats 2 --no-record &&
            $py -m bench.sampling --device cuda --repeats 2 --runner-process --before-root . --no-record &&
            $py -m bench.sampling --device cuda "${small[@]}" --repeats 2 --runner-process --before-root . \
                --no-record ;;
    stream)
        $py -m bench.stream_interval --device cuda --rounds 3 &&
            $py -m bench.stream_interval --device cuda "${small[@]}" --rounds 3 ;;
    *) echo "unknown step $1" >&2; return 2 ;;
    esac
}

status=0
for step in "${steps[@]}"; do
    echo "== $step"
    started=$SECONDS
    run_step "$step" >"$out/$step.log" 2>&1
    rc=$?
    grep -v -e "Warning" -e "warn(" -e "it/s]" "$out/$step.log" | tail -n 30
    echo "== $step: rc $rc in $((SECONDS - started)) s"
    [ $rc -eq 0 ] || status=1
done
exit $status
