#!/usr/bin/env bash
# The GPU check of issue 11, in one run: parity on the device, bpo's 7B benchmarks, and the PyTorch baselines on the
# same shapes on the same card, merged into one JSON. Run it from anywhere on a machine with an NVIDIA GPU; it cds
# to the repository root. docs/gpu-check.md says how to read the result.
#
# Usage: scripts/gpu-check.sh [--dry-run] [--device cpu|cuda] [--dtype f32|bf16|f16] [--preset NAME] [--budget S]
#   (default)   --device cuda --dtype bf16 --preset llava-7b, everything under a 540 s budget
#   --dry-run   the same flow on the CPU: --device cpu --dtype f32 --preset tiny, no nvidia-smi, no CUDA libraries
#               (`--device cpu` alone implies the same defaults)
#
# Writes under ${OUT:-./gpu-check-out} (at most 8 files, so the device tool brings them all back):
#   gpu-check.json   everything: card, date, per-step status and time, parity pass/fail, bpo and PyTorch figures
#                    and their ratios
#   gpu-check.log    this script's output, every step's output, ldd and nvidia-smi
#   parity.json      `bpo bench parity`'s own report
#   raw/*.json       the main benchmarks' own JSON (also embedded in gpu-check.json, with the smaller steps' JSON)
#
# Exit status: 0 parity passed; 1 a parity check failed; 2 parity could not run (no binary, no subcommand, an error
# before any check, time-out).
# Benchmark failures do not change it: they are recorded per step in gpu-check.json.
#
# Environment:
#   BPO_BIN       the bpo binary (default: gunzip target/cuda/bpo-cuda.gz, from scripts/build-cuda.sh; a dry run
#                 takes target/release/bpo first)
#   OUT           output folder (default ./gpu-check-out)
#   PEAK_TFLOPS   dense bf16 peak of the card for MFU (default 989, H100/H200 SXM datasheet)
#   PEAK_GBS      memory bandwidth of the card in GB/s, for the decode's bandwidth use (default 4800, H200;
#                 H100 SXM 3350)
#   PYTHON        python with torch, transformers and peft (default python3)
#
# Time budget (H200, 7B bf16; the device tool allows 600 s a command): each step runs under `timeout`, capped by
# what is left of --budget (default 540 s) minus 15 s kept for the merge; a step with under 10 s left is skipped.
# Steps in order of importance:
#   setup (gunzip, ldd, nvidia-smi, python probe)  ~15 s
#   jit-cold, jit-warm    (tiny train step with an empty, then a filled, PTX cache: the JIT cost)    2 x 25 s
#   parity                                          75 s
#   bpo bench train       (7B full depth, 4 pairs x 730 positions, r64 on every projection, gradient
#                          checkpointing, LoRA dropout 0.05 and 0)                                  120 s
#   torch train baseline  (the same, gradient_checkpointing=True, dropout 0.05)                    100 s
#   bpo bench generate    (7B, batch 1 8 32)        90 s
#   bpo generate, event tracking on (batch 1; the A/B of cudarc's event tracking, off by default)   40 s
#   torch generate baseline                         70 s
#   bpo train memory      (1, 2 and 4 pairs without checkpointing, one step each; one that does not fit
#                          is recorded and the others run)                                          90 s
#   bpo bench generate --workload mixed (7B, 96 requests, batch 8: static, then continuous)   90 s
#   bpo bench train --objective dpo mdpo (7B, the train shapes, 2 steps each; with what time is left)  60 s
#   merge                                           ~2 s
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2

device=cuda dtype= preset= budget=540 dry_run=0
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry_run=1 device=cpu ;;
        --device) device=$2; shift ;;
        --dtype) dtype=$2; shift ;;
        --preset | --size) preset=$2; shift ;;
        --budget) budget=$2; shift ;;
        -h | --help) sed -n '2,38p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
case $device in
    cpu) dry_run=1 dtype=${dtype:-f32} preset=${preset:-tiny} ;;
    cuda*) dtype=${dtype:-bf16} preset=${preset:-llava-7b} ;;
    *) echo "gpu-check: --device cpu|cuda|cuda:N" >&2; exit 2 ;;
esac

OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT/raw"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu-check.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
PEAK_GBS=${PEAK_GBS:-4800}
PYTHON=${PYTHON:-python3}
STEPS=$WORK/steps.tsv # name, status, rc, seconds, timeout, smi base MiB, smi peak MiB, note
: >"$STEPS"
: >"$WORK/notes"
start=$SECONDS
smi_pid=
use_smi=$((1 - dry_run))

cleanup() {
    [ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
say() { printf '[gpu-check %3ds] %s\n' $((SECONDS - start)) "$*"; }
note() { say "note: $*"; printf '%s\n' "$*" >>"$WORK/notes"; }
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"; }

# Seconds a step may take: its own budget, capped by what is left of the whole (15 s kept for the merge).
step_timeout() {
    local want=$1 left=$((budget - (SECONDS - start) - 15))
    [ "$left" -lt "$want" ] && want=$left
    echo "$want"
}

# Peak GPU memory during a step: nvidia-smi sampled every 200 ms in the background.
smi_start() {
    smi_base= smi_pid=
    [ "$use_smi" = 1 ] || return
    smi_base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -d ' ')
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$WORK/smi-$1.csv" 2>/dev/null &
    smi_pid=$!
}
smi_stop() {
    smi_peak=
    [ -z "$smi_pid" ] && return
    kill "$smi_pid" 2>/dev/null
    wait "$smi_pid" 2>/dev/null
    smi_pid=
    smi_peak=$(tr -d ' ' <"$WORK/smi-$1.csv" | sort -n | tail -1)
}

# run_step NAME WANT_SECONDS CMD...: runs CMD under timeout, logs it, records status, time and peak memory.
run_step() {
    local name=$1 want=$2 t rc t0 secs status
    shift 2
    t=$(step_timeout "$want")
    if [ "$t" -lt 10 ]; then
        note "$name skipped: out of time (${t}s left of the ${budget}s budget)"
        record "$name" skipped "" "" "$t" "" "" "out of time"
        return 99
    fi
    say "=== $name (timeout ${t}s): $*"
    smi_start "$name"
    t0=$(now)
    timeout -k 10 "$t" "$@" 2>&1 | tee "$WORK/$name.out"
    rc=${PIPESTATUS[0]}
    secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
    smi_stop "$name"
    case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    say "=== $name: $status (rc $rc) in $secs s${smi_peak:+, GPU memory peak ${smi_peak} MiB (before: ${smi_base} MiB)}"
    local why=
    [ "$status" = failed ] && why=$(grep -v '^[[:space:]]*$' "$WORK/$name.out" | tail -1 | cut -c1-300 | tr '\t' ' ')
    record "$name" "$status" "$rc" "$secs" "$t" "${smi_base:-}" "${smi_peak:-}" "$why"
    return $rc
}

# has_flag "SUBCOMMAND..." FLAG: whether `bpo SUBCOMMAND --help` lists FLAG.
# (The help is read whole first: `grep -q` on a pipe would stop reading early, and pipefail would count the
# writer's SIGPIPE as a failure.)
has_flag() {
    local help
    help=$("$BPO" $1 --help 2>/dev/null) || return 1
    grep -qE -- "(^|[[:space:],])$2([][:space:]=,]|\$)" <<<"$help" # also clap's "[aliases: --preset]"
}

main() {
    say "repo $repo, device $device, dtype $dtype, preset $preset, budget ${budget}s, out $OUT$([ "$dry_run" = 1 ] && echo ', dry run')"

    # --- the binary -------------------------------------------------------------------------------------------
    BPO=${BPO_BIN:-}
    # A dry run on a CPU machine takes the CPU build first: the CUDA binary needs the driver's libcuda.so.1 to start.
    if [ -z "$BPO" ] && [ "$dry_run" = 1 ] && [ -x target/release/bpo ]; then BPO=$repo/target/release/bpo; fi
    if [ -z "$BPO" ] && [ -f target/cuda/bpo-cuda.gz ]; then
        BPO=$WORK/bpo
        gunzip -c target/cuda/bpo-cuda.gz >"$BPO" && chmod +x "$BPO" || BPO=
        [ -n "$BPO" ] && say "binary: target/cuda/bpo-cuda.gz unpacked to $BPO"
    fi
    if [ -z "$BPO" ] || [ ! -x "$BPO" ]; then
        note "no bpo binary: set BPO_BIN or carry target/cuda/bpo-cuda.gz (scripts/build-cuda.sh)"
        BPO=
    else
        say "binary: $BPO"
    fi

    # --- CUDA libraries and the card --------------------------------------------------------------------------
    if [ "$dry_run" = 0 ]; then
        # The binary needs the driver's libcuda.so.1 plus the CUDA 13 runtime, cuBLAS(Lt) and cuRAND (docs/gpu.md;
        # libcudnn.so.9 too for a cudnn build). PyTorch's cu130 wheels install them into site-packages/nvidia/cu13/lib (CUDA 12 wheels:
        # nvidia/<library>/lib).
        local libs
        libs=$("$PYTHON" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = []
for p in nvidia.__path__:
    for d in [os.path.join(p, "cu13", "lib")] + sorted(glob.glob(os.path.join(p, "*", "lib"))):
        if os.path.isdir(d) and d not in dirs and glob.glob(os.path.join(d, "lib*.so*")):
            dirs.append(d)
print(":".join(dirs))
PY
)
        # candle's kernels are PTX that the driver compiles on first use; let its cache keep them for the later
        # steps (parity runs first and pays for it).
        export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
        if [ -n "$libs" ]; then
            export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
            say "LD_LIBRARY_PATH += PyTorch's CUDA libraries: $libs"
        else
            note "no site-packages/nvidia/*/lib found with $PYTHON: relying on the system's CUDA libraries"
        fi
        if [ -n "$BPO" ]; then
            if ldd "$BPO" 2>&1 | grep 'libcuda.so.1 => not found' >/dev/null; then
                for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
                    [ -e "$d/libcuda.so.1" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$d && say "driver library from $d" && break
                done
            fi
            say "ldd $BPO:"
            ldd "$BPO" 2>&1 | sed 's/^/    /'
            ldd "$BPO" 2>&1 | awk '/not found/ {print $1}' >"$WORK/missing-libs"
            [ -s "$WORK/missing-libs" ] && note "missing libraries: $(tr '\n' ' ' <"$WORK/missing-libs")"
        fi
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader >"$WORK/card"
            say "card: $(cat "$WORK/card")"
        else
            note "nvidia-smi not found: no card summary, no memory sampling"
            use_smi=0
        fi
    else
        say "dry run: no nvidia-smi, no CUDA library lookup"
    fi
    echo "${LD_LIBRARY_PATH:-}" >"$WORK/ld_library_path"
    # A CUDA build without its libraries does not start at all (not even --help): say so, not "no such flag".
    if [ -n "$BPO" ] && ! "$BPO" --help >/dev/null 2>"$WORK/bpo-start.err"; then
        note "the bpo binary does not start: $(head -c 300 "$WORK/bpo-start.err" | tr '\n' ' ')"
        BPO=
    fi

    # --- the PTX JIT: candle's and bpo's kernels are PTX the driver compiles on first use -------------------------
    # A tiny training step with an empty cache, then again with the filled cache; every later step uses it.
    if [ -n "$BPO" ] && [ "$dry_run" = 0 ]; then
        export CUDA_CACHE_PATH=$WORK/nv-cache
        run_step jit-cold 25 "$BPO" bench train --size tiny --device "$device" --dtype "$dtype" --steps 1 \
            --lora-dropout 0.05 --gradient-checkpointing on
        run_step jit-warm 25 "$BPO" bench train --size tiny --device "$device" --dtype "$dtype" --steps 1 \
            --lora-dropout 0.05 --gradient-checkpointing on
    fi

    # --- parity -----------------------------------------------------------------------------------------------
    if [ -z "$BPO" ]; then
        record parity missing "" "" "" "" "" "no binary"
    elif ! "$BPO" bench parity --help >/dev/null 2>&1; then
        note "this binary has no \`bpo bench parity\`: parity not run"
        record parity missing "" "" "" "" "" "no bench parity subcommand"
    else
        run_step parity 75 "$BPO" bench parity --device "$device" --fixtures tests/fixtures --json "$OUT/parity.json"
    fi

    # --- what the benches accept ------------------------------------------------------------------------------
    local size_args=() train=() memory=() gen=() events=() mixed=() mdpo=() steps=3 repeats=2
    [ "$dry_run" = 1 ] && steps=5 repeats=3
    if [ -n "$BPO" ]; then
        if has_flag "bench train" --preset; then
            size_args=(--preset "$preset")
        elif has_flag "bench train" --size && grep -qw -- "$preset" <<<"$("$BPO" bench train --help 2>/dev/null)"; then
            size_args=(--size "$preset")
        else
            note "this binary has no --preset: the $preset benches cannot run"
        fi
    fi
    # bench train: device, dtype, the paper's LoRA recipe, MFU against the card's peak, JSON.
    add() { # add ARRAY "SUBCOMMAND" FLAG VALUES...: append FLAG VALUES if the subcommand takes FLAG, else note it
        local -n arr=$1
        local sub=$2 flag=$3
        shift 3
        if has_flag "$sub" "$flag"; then arr+=("$flag" "$@"); else note "bpo $sub has no $flag: left out"; fi
    }
    if [ -n "$BPO" ] && [ ${#size_args[@]} -gt 0 ]; then
        train=("${size_args[@]}")
        add train "bench train" --device "$device"
        add train "bench train" --dtype "$dtype"
        # Rows of 730 positions (576 of them the image), as LLaVA-1.5's instruction data averages.
        add train "bench train" --prompt-words 52
        add train "bench train" --answer-words 100
        add train "bench train" --lora-rank 64
        add train "bench train" --targets q k v o gate up down
        add train "bench train" --peak-tflops "$PEAK_TFLOPS"
        # Peak memory without checkpointing at 1, 2 and 4 pairs (one step each): what fits without it.
        memory=("${train[@]}")
        add memory "bench train" --pairs 1 2 4
        add memory "bench train" --gradient-checkpointing off
        add memory "bench train" --steps 1
        add memory "bench train" --json "$WORK/bpo-train-memory.json"
        add train "bench train" --pairs 4
        add train "bench train" --steps "$steps"
        add train "bench train" --gradient-checkpointing on
        add train "bench train" --lora-dropout 0.05 0 # the training default first, then without (its cost)
        add train "bench train" --json "$OUT/raw/bpo-train.json"
        # mDPO's step against DPO's at the same shapes, checkpointing on, back to back (issue 29's step-time line).
        if has_flag "bench train" --objective; then
            mdpo=("${size_args[@]}" --device "$device" --dtype "$dtype" --prompt-words 52 --answer-words 100)
            mdpo+=(--lora-rank 64 --targets q k v o gate up down --pairs 4 --steps 2 --gradient-checkpointing on)
            mdpo+=(--objective dpo mdpo --json "$WORK/bpo-train-mdpo.json")
        else
            note "this binary has no \`bench train --objective\`: mDPO's step is not timed"
        fi
        gen=("${size_args[@]}")
        add gen "bench generate" --device "$device"
        add gen "bench generate" --dtype "$dtype"
        add gen "bench generate" --repeats "$repeats"
        add gen "bench generate" --greedy-only # the baseline is greedy
        add gen "bench generate" --peak-gbs "$PEAK_GBS"
        events=("${gen[@]}")
        add gen "bench generate" --batch 1 8 32
        add gen "bench generate" --json "$OUT/raw/bpo-generate.json"
        add events "bench generate" --batch 1
        add events "bench generate" --json "$WORK/bpo-generate-events.json"
        # The engine's continuous batching against static batching on bootstrapping's mix (issue 24).
        if has_flag "bench generate" --workload; then
            mixed=("${size_args[@]}" --workload mixed --device "$device" --dtype "$dtype" --batch 8 --requests 96)
            mixed+=(--json "$WORK/bpo-mixed.json")
        else
            note "this binary has no \`bench generate --workload\`: the mixed workload is not run"
        fi
        # One config for both baselines: `bench train --write-config` writes the same Size::config() as
        # `bench generate --write-config`, and exits at once (the latter goes on to run the benchmark).
        "$BPO" bench train "${size_args[@]}" --write-config "$WORK/model-config.json" >/dev/null ||
            note "bpo bench train --write-config failed: no PyTorch baselines"
    fi

    # --- PyTorch ----------------------------------------------------------------------------------------------
    local torch_ok=0
    local probe="import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
    [ "$device" != cpu ] && probe="$probe; assert torch.cuda.is_available(), 'torch sees no GPU'"
    if "$PYTHON" -c "$probe" >"$WORK/torch-version" 2>"$WORK/torch-error"; then
        torch_ok=1
        say "torch, transformers, peft: $(cat "$WORK/torch-version")"
    else
        note "torch not available: baseline skipped ($(tail -1 "$WORK/torch-error"))"
    fi

    # --- benchmarks: train first (the MFU and memory goals), each bpo run followed by its baseline ---------------
    if [ ${#train[@]} -gt 0 ]; then
        run_step bpo-train 120 "$BPO" bench train "${train[@]}"
    else
        record bpo-train skipped "" "" "" "" "" "no usable binary or preset"
    fi
    if [ "$torch_ok" = 1 ] && [ -f "$WORK/model-config.json" ]; then
        run_step torch-train 100 env PYTHONUNBUFFERED=1 "$PYTHON" scripts/bench_torch_train.py \
            --config "$WORK/model-config.json" --device "$device" --dtype "$dtype" --steps "$steps" \
            --batch-pairs 4 --prompt-tokens 52 --answer-tokens 100 --lora-rank 64 --targets q,k,v,o,gate,up,down \
            --lora-dropout 0.05 --gradient-checkpointing --peak-tflops "$PEAK_TFLOPS" \
            --threads "$(nproc)" --json "$OUT/raw/torch-train.json"
    else
        record torch-train skipped "" "" "" "" "" "$([ "$torch_ok" = 1 ] && echo 'no config' || echo 'torch not available')"
    fi
    if [ ${#gen[@]} -gt 0 ]; then
        run_step bpo-generate 90 "$BPO" bench generate "${gen[@]}"
        run_step bpo-generate-events 40 env BPO_CUDA_EVENT_TRACKING=1 "$BPO" bench generate "${events[@]}"
    else
        record bpo-generate skipped "" "" "" "" "" "no usable binary or preset"
    fi
    if [ "$torch_ok" = 1 ] && [ -f "$WORK/model-config.json" ]; then
        run_step torch-generate 70 env PYTHONUNBUFFERED=1 "$PYTHON" scripts/bench_torch.py \
            --config "$WORK/model-config.json" --device "$device" --dtype "$dtype" --batches 1,8,32 \
            --repeats "$repeats" --threads "$(nproc)" --json "$OUT/raw/torch-generate.json"
    else
        record torch-generate skipped "" "" "" "" "" "$([ "$torch_ok" = 1 ] && echo 'no config' || echo 'torch not available')"
    fi
    if [ ${#memory[@]} -gt 0 ]; then
        run_step bpo-train-memory 90 "$BPO" bench train "${memory[@]}"
    fi
    if [ ${#mixed[@]} -gt 0 ]; then
        run_step bpo-mixed 90 "$BPO" bench generate "${mixed[@]}"
    else
        record bpo-mixed skipped "" "" "" "" "" "no usable binary, preset or --workload"
    fi
    # Last: whatever time is left (skipped when the budget is spent).
    if [ ${#mdpo[@]} -gt 0 ]; then
        run_step bpo-train-mdpo 60 "$BPO" bench train "${mdpo[@]}"
    fi

    # --- merge ------------------------------------------------------------------------------------------------
    say "=== merge into $OUT/gpu-check.json"
    GC_DEVICE=$device GC_DTYPE=$dtype GC_PRESET=$preset GC_DRY=$dry_run GC_BUDGET=$budget GC_BIN=${BPO:-} \
        GC_ELAPSED=$((SECONDS - start)) GC_PEAK=$PEAK_TFLOPS GC_PEAK_GBS=$PEAK_GBS GC_WORK=$WORK GC_OUT=$OUT python3 - <<'PY'
import json, os, platform, socket, time

E = os.environ
work, out = E["GC_WORK"], E["GC_OUT"]
dtype = E["GC_DTYPE"]
peak_tflops, peak_gbs = float(E["GC_PEAK"]), float(E["GC_PEAK_GBS"])


def read(path, default=""):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return default


def load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def num(x):
    try:
        return float(x) if x not in ("", None) else None
    except ValueError:
        return None


def ratio(a, b):
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return a / b if ok and b else None


def pair(b, t):
    """A figure on both sides and bpo / torch."""
    return {"bpo": b, "torch": t, "bpo_over_torch": ratio(b, t)}


def flat_rows(report):
    """A report's figures as flat dicts: bpo's {"rows": [{..., "figures": {...}}]}, the torch scripts'
    {"figures": [...]} (generate) or one flat dict (train)."""
    if not isinstance(report, dict):
        return []
    rows = report.get("rows")
    if not isinstance(rows, list):  # the torch train script's "rows" is its row count
        rows = report["figures"] if isinstance(report.get("figures"), list) else [report]
    flat = []
    for r in rows:
        d = {k: v for k, v in r.items() if k != "figures"}
        if isinstance(r.get("figures"), dict):
            d.update(r["figures"])
        flat.append(d)
    return flat


# --- steps (status, seconds, nvidia-smi peak) ---------------------------------------------------------------------
steps = []
for line in read(os.path.join(work, "steps.tsv")).splitlines():
    name, status, rc, secs, timeout, base, peak, why = (line.split("\t") + [""] * 8)[:8]
    s = {"name": name, "status": status, "rc": int(rc) if rc else None, "seconds": num(secs), "timeout_s": num(timeout)}
    if peak:
        s["gpu_memory_peak_mib"] = num(peak)
        s["gpu_memory_before_mib"] = num(base)
    if why:
        s["note"] = why
    steps.append(s)
by_step = {s["name"]: s for s in steps}


def smi(step):
    return by_step.get(step, {}).get("gpu_memory_peak_mib")


# --- parity -------------------------------------------------------------------------------------------------------
report = load(os.path.join(out, "parity.json"))
pstep = by_step.get("parity", {})
failed_checks = []
if pstep.get("status") == "failed" and not report:
    pstep["status"] = "error"  # stopped before any check ran (no CUDA in the binary, no GPU, bad fixtures path)
if pstep.get("status") in ("ok", "failed"):
    parity_pass = pstep["status"] == "ok"
    if isinstance(report, dict):
        checks = report.get("checks") or []
        failed_checks = [c.get("name") for c in checks if not c.get("pass")]
        if "failed" in report:
            parity_pass = parity_pass and report["failed"] == 0
        elif checks:
            parity_pass = parity_pass and not failed_checks
        elif "pass" in report:
            parity_pass = parity_pass and bool(report["pass"])
else:
    parity_pass = None  # not run: no binary, no subcommand, out of time or timed out

# --- shapes -------------------------------------------------------------------------------------------------------
cfg = load(os.path.join(work, "model-config.json"))
weight_bytes = None
if cfg:
    t = cfg["text_config"]
    h, i, l, v = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    kv = h // t["num_attention_heads"] * t.get("num_key_value_heads", t["num_attention_heads"])
    # What one decoded token reads: every language-model matmul weight (as bpo's --peak-gbs figure counts).
    weight_bytes = (l * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v) * {"f32": 4, "bf16": 2, "f16": 2}[dtype]

# --- train --------------------------------------------------------------------------------------------------------
bt, tt = load(os.path.join(out, "raw", "bpo-train.json")), load(os.path.join(out, "raw", "torch-train.json"))
b_rows = [r for r in flat_rows(bt) if not r.get("plain_backward") and "error" not in r]
b = next(iter(b_rows), {})  # LoRA dropout 0.05, the training default
b_no_dropout = next((r for r in b_rows if r.get("lora_dropout") == 0), {})
t = next(iter(flat_rows(tt)), {})
bm = load(os.path.join(work, "bpo-train-memory.json"))


def mem(r, key="peak_bytes"):
    return (r.get("memory") or {}).get(key) if r else None
b_s, t_s = b.get("seconds", b.get("s_per_step")), t.get("s_per_step")
b_flops = b.get("model_flops", b.get("model_flops_per_step"))
train = {
    "s_per_step": pair(b_s, t_s),
    "speedup": ratio(t_s, b_s),
    "pairs_per_s": pair(b.get("pairs_per_s"), t.get("pairs_per_s")),
    # Both on bpo's FLOP count (same numerator, so the ratio is the speed ratio); torch's own estimate beside.
    "mfu": pair(b.get("mfu"), ratio(b_flops, t_s * peak_tflops * 1e12) if b_flops and t_s else t.get("mfu")),
    "mfu_torch_own_flop_count": t.get("mfu"),
    "model_flops_per_step": {"bpo": b_flops, "torch_estimate": t.get("model_flops_per_step")},
    # Both count every row's positions, as TRL's num_tokens does (bpo runs each prompt once but counts it twice).
    "tokens_per_s": pair(b.get("tokens_per_s"), t.get("tokens_per_s")),
    "peak_memory_bytes": pair(mem(b), t.get("peak_memory_bytes")),
    "bpo_peak_memory_growth_bytes": mem(b, "peak_growth_bytes"),
    "gradient_checkpointing": {"bpo": b.get("gradient_checkpointing"), "torch": t.get("gradient_checkpointing")},
    # The cost of LoRA dropout (masks drawn on the device): seconds per step with 0.05 over without.
    "dropout_cost": {"s_per_step_dropout_0.05": b_s, "s_per_step_dropout_0": b_no_dropout.get("seconds"),
                     "ratio": ratio(b_s, b_no_dropout.get("seconds"))},
    # Without checkpointing, 1, 2 and 4 pairs, one step each: peak device memory, or the error (out of memory).
    "without_checkpointing": [{"pairs": r.get("pairs", (r.get("rows") or 0) // 2), "peak_bytes": mem(r),
                               "peak_growth_bytes": mem(r, "peak_growth_bytes"), "s_per_step": r.get("seconds"),
                               "error": r.get("error")} for r in flat_rows(bm)],
    "torch_peak_memory_reserved_bytes": t.get("peak_memory_reserved_bytes"),
    "nvidia_smi_peak_mib": pair(smi("bpo-train"), smi("torch-train")),
    "bpo": bt, "torch": tt,
}
# Same shapes? Positions per step as TRL counts them (every row's prompt and answer): bpo's tokens/s x s/step
# against PyTorch's rows x length (or, without a PyTorch run, what bench_torch_train.py would build).
notes = [n for n in read(os.path.join(work, "notes")).splitlines() if n]
if b_s and b.get("tokens_per_s"):
    bpo_pos = round(b["tokens_per_s"] * b_s)
    if t.get("rows") and t.get("length"):
        torch_pos = t["rows"] * t["length"]
    elif cfg:
        vc = cfg["vision_config"]
        torch_pos = 2 * (b.get("rows", 8) // 2) * (1 + (vc["image_size"] // vc["patch_size"]) ** 2 + 52 + 101)
    else:
        torch_pos = None
    train["shape_check"] = {"bpo_positions_per_step": bpo_pos, "torch_positions_per_step": torch_pos,
                            "same": bpo_pos == torch_pos if torch_pos else None}
    if torch_pos and bpo_pos != torch_pos:
        notes.append(f"train shapes differ: bpo runs {bpo_pos} positions per step, the PyTorch baseline {torch_pos} "
                     "(rows of 1 + image + 52 + 101 positions): the train ratios are not like for like")

# --- generate -----------------------------------------------------------------------------------------------------
bg, tg = load(os.path.join(out, "raw", "bpo-generate.json")), load(os.path.join(out, "raw", "torch-generate.json"))


def greedy(rows):
    return {int(r["batch"]): r for r in rows if "batch" in r and r.get("sampling", "greedy") == "greedy"}


def mbu(r):
    if not r:
        return None
    if r.get("decode_bandwidth_utilisation") is not None:
        return r["decode_bandwidth_utilisation"]
    d = r.get("decode_tok_s")
    return d / r["batch"] * weight_bytes / (peak_gbs * 1e9) if d and weight_bytes else None


brows, trows = greedy(flat_rows(bg)), greedy(flat_rows(tg))
by_batch = []
for batch in sorted(set(brows) | set(trows)):
    br, tr = brows.get(batch, {}), trows.get(batch, {})
    row = {"batch": batch, "prompt_tokens": br.get("prompt_tokens", tr.get("prompt_tokens"))}
    for key in ("prefill_tok_s", "decode_tok_s", "end_to_end_tok_s"):
        row[key] = pair(br.get(key), tr.get(key))
    row["decode_bandwidth_utilisation"] = pair(mbu(br), mbu(tr))
    row["torch_peak_memory_bytes"] = tr.get("peak_memory_bytes")
    if br.get("prompt_tokens") and tr.get("prompt_tokens") and br["prompt_tokens"] != tr["prompt_tokens"]:
        notes.append(f"generate prompts differ at batch {batch}: bpo {br['prompt_tokens']} tokens, PyTorch "
                     f"{tr['prompt_tokens']}: the generate ratios are not like for like")
    by_batch.append(row)
# cudarc's event tracking (off in bpo): batch-1 decode with it on, against the main run's batch 1 (off).
ev = greedy(flat_rows(load(os.path.join(work, "bpo-generate-events.json")))).get(1, {})
b1_off = brows.get(1, {})
events = {"decode_tok_s_tracking_off": b1_off.get("decode_tok_s"), "decode_tok_s_tracking_on": ev.get("decode_tok_s"),
          "off_over_on": ratio(b1_off.get("decode_tok_s"), ev.get("decode_tok_s"))}
generate = {"by_batch": by_batch, "event_tracking": events,
            "nvidia_smi_peak_mib": pair(smi("bpo-generate"), smi("torch-generate")),
            "weight_bytes_per_decoded_token": weight_bytes, "peak_gbs": peak_gbs, "bpo": bg, "torch": tg}

# --- mixed workload: continuous against static batching, one bpo run ------------------------------------------
bm = load(os.path.join(work, "bpo-mixed.json"))
mixed_by = {r.get("policy"): r for r in flat_rows(bm)}
cont, stat = mixed_by.get("continuous", {}), mixed_by.get("static", {})
mixed = {key: {"continuous": cont.get(key), "static": stat.get(key)}
         for key in ("new_tok_s", "requests_per_s", "ttft_mean_s", "ttft_p90_s", "wasted_share", "occupancy")}
mixed["continuous_over_static_tok_s"] = ratio(cont.get("new_tok_s"), stat.get("new_tok_s"))
mixed["nvidia_smi_peak_mib"] = smi("bpo-mixed")
mixed["bpo"] = bm

# --- mDPO against DPO: the same step shapes, back to back in one run ---------------------------------------------
bmd = flat_rows(load(os.path.join(work, "bpo-train-mdpo.json")))
md_s = {bool(r.get("mdpo")): r.get("seconds") for r in bmd}
mdpo_step = {"dpo_s_per_step": md_s.get(False), "mdpo_s_per_step": md_s.get(True),
             "mdpo_over_dpo": ratio(md_s.get(True), md_s.get(False)), "nvidia_smi_peak_mib": smi("bpo-train-mdpo")}

# --- issue 11's GPU goals (goals, not gates) ----------------------------------------------------------------------
b1 = next((r for r in by_batch if r["batch"] == 1), None)
train_mem = mem(b) or (smi("bpo-train") * 1048576 if smi("bpo-train") else None)
goals = {
    "train_mfu_at_least_40pct": {"value": train["mfu"]["bpo"]},
    "decode_batch1_bandwidth_at_least_50pct": {"value": b1["decode_bandwidth_utilisation"]["bpo"] if b1 else None},
    "train_peak_memory_under_80GB": {"value_gb": train_mem / 1e9 if train_mem else None},
}
for g, limit, above in ((goals["train_mfu_at_least_40pct"], 0.40, True),
                        (goals["decode_batch1_bandwidth_at_least_50pct"], 0.50, True),
                        (goals["train_peak_memory_under_80GB"], 80.0, False)):
    x = g.get("value", g.get("value_gb"))
    if E["GC_DEVICE"] == "cpu":  # the goals are for an H100/H200-class GPU and a 7B model
        g["met"] = None
        g["note"] = "GPU goal: not judged on the CPU"
    else:
        g["met"] = None if x is None else (x >= limit if above else x < limit)

card = read(os.path.join(work, "card")).strip()
res = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "card": card.split(",")[0].strip() if card else ("cpu" if E["GC_DRY"] == "1" else None),
    "card_details": card or None,
    "device": E["GC_DEVICE"], "dtype": dtype, "preset": E["GC_PRESET"], "dry_run": E["GC_DRY"] == "1",
    "pass": parity_pass,
    "summary": {
        "parity_pass": parity_pass, "parity_failed_checks": failed_checks,
        "train_s_per_step": train["s_per_step"], "train_speedup_over_torch": train["speedup"],
        "train_pairs_per_s": train["pairs_per_s"], "train_mfu": train["mfu"],
        "train_nvidia_smi_peak_mib": train["nvidia_smi_peak_mib"],
        "train_peak_memory_bytes": train["peak_memory_bytes"],
        "train_dropout_cost": train["dropout_cost"]["ratio"],
        "train_without_checkpointing": train["without_checkpointing"],
        # The driver's PTX compilation on first use: the same tiny step with an empty and with a filled cache.
        "ptx_jit_seconds": (by_step.get("jit-cold", {}).get("seconds") or 0) - (by_step.get("jit-warm", {}).get("seconds") or 0)
        if by_step.get("jit-cold", {}).get("seconds") and by_step.get("jit-warm", {}).get("seconds") else None,
        "decode_event_tracking": events,
        "decode_tok_s": {r["batch"]: r["decode_tok_s"] for r in by_batch},
        "prefill_tok_s": {r["batch"]: r["prefill_tok_s"] for r in by_batch},
        "mixed_continuous_over_static_tok_s": mixed["continuous_over_static_tok_s"],
        "mdpo_over_dpo_step": mdpo_step["mdpo_over_dpo"],
        "goals": goals,
    },
    "host": socket.gethostname(), "platform": platform.platform(),
    "peak_tflops": peak_tflops, "peak_gbs": peak_gbs,
    "budget_s": num(E["GC_BUDGET"]), "elapsed_s": num(E["GC_ELAPSED"]),
    "bpo_binary": E["GC_BIN"] or None,
    "ld_library_path": read(os.path.join(work, "ld_library_path")).strip() or None,
    "missing_libraries": read(os.path.join(work, "missing-libs")).split(),
    "torch": read(os.path.join(work, "torch-version")).strip() or None,
    "notes": notes,
    "steps": steps,
    "model_config": cfg,
    "parity": {"pass": parity_pass, "failed_checks": failed_checks, "report": report},
    "train": train,
    "generate": generate,
    "mixed": mixed,
    "mdpo_step": mdpo_step,
}
with open(os.path.join(out, "gpu-check.json"), "w") as fh:
    json.dump(res, fh, indent=1)
print(json.dumps({"card": res["card"], "steps": {s["name"]: s["status"] for s in steps}, **res["summary"],
                  "notes": res["notes"]}, indent=1))
PY
    local p
    p=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pass"])' "$OUT/gpu-check.json" 2>/dev/null)
    say "done in $((SECONDS - start)) s: parity pass = $p; $OUT/gpu-check.json"
    case $p in True) return 0 ;; False) return 1 ;; *) return 2 ;; esac
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
