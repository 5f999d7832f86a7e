#!/usr/bin/env bash
# Build bpo with CUDA (`--features cuda`) on a Linux x86_64 machine that has no GPU and no system CUDA.
#
# Usage: scripts/build-cuda.sh [build|clippy|toolkit|env] [extra cargo arguments...]
#   build    (default) install the toolkit if needed, `cargo build --release --features cuda`, then write
#            $CARGO_TARGET_DIR/bpo-cuda.gz and print its size and the shared libraries it needs at run time
#   clippy   `cargo clippy --release --features cuda --all-targets` in the same environment
#   toolkit  only install and lay out the CUDA toolkit
#   env      print the environment as `export` lines: eval "$(scripts/build-cuda.sh env)"
#
# The toolkit comes from PyPI (the `cuda-toolkit` meta-package's nvcc, cccl, cudart, cublas, curand and nvrtc
# wheels: about 680 MB to download, 1.2 GB installed) through `python3 -m pip install --target`, into
# $BPO_CUDA_HOME (default ~/.cache/bpo/cuda-13.0), and is reused when present. Nothing is installed system-wide.
# Needs: python3 with pip, a C/C++ compiler (gcc <= 14, used by nvcc as host compiler), cargo, network to PyPI.
#
# Environment:
#   BPO_CUDA_HOME     toolkit cache folder (default ~/.cache/bpo/cuda-13.0)
#   CUDA_COMPUTE_CAP  GPU architecture the kernels are compiled for (default 90: H100/H200;
#                     80: A100, 89: L4/RTX 4090, 86: A10/RTX 3090). See docs/gpu.md.
#   CARGO_TARGET_DIR  cargo target folder (default target/cuda, apart from the CPU build's target/)
#   BPO_CUDA_FEATURES cargo features (default `cuda`)
#   CUDAFORGE_THREADS parallel nvcc jobs of candle-kernels' build script (default: all cores)
#
# Versions: cudarc's build script accepts CUDA 13.0-13.4 only (13.5's nvcc makes it panic). 13.0 is pinned on
# purpose: a binary linked against the 13.0 runtime runs with any CUDA 13.x runtime libraries (e.g. those of
# PyTorch's cu130 wheels) and any driver that supports CUDA 13.
set -euo pipefail

CUDA_TOOLKIT_SPEC='cuda-toolkit[nvcc,cccl,cudart,cublas,curand,nvrtc]==13.0.3'
CUDNN_SPEC='nvidia-cudnn-cu13==9.19.0.56' # only for BPO_CUDA_FEATURES=cudnn; the cuDNN that PyTorch 2.11 ships

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=${1:-build}
[ $# -gt 0 ] && shift

cuda_home=${BPO_CUDA_HOME:-$HOME/.cache/bpo/cuda-13.0}
pkgs=$cuda_home/pkgs
root=$pkgs/nvidia/cu13 # the wheels' CUDA 13 tree: bin/nvcc, include/, lib/, nvvm/
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/cuda}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
features=${BPO_CUDA_FEATURES:-cuda}

log() { printf '[build-cuda] %s\n' "$*" >&2; }

install_toolkit() {
    if [ -f "$cuda_home/.installed" ] && [ "$(cat "$cuda_home/.installed")" = "$CUDA_TOOLKIT_SPEC" ]; then
        log "toolkit: reusing $cuda_home"
    else
        log "toolkit: installing $CUDA_TOOLKIT_SPEC into $cuda_home (about 680 MB from PyPI)"
        local t0=$SECONDS
        rm -rf "$pkgs" "$pkgs.partial" "$cuda_home/.installed"
        mkdir -p "$cuda_home"
        python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check --root-user-action=ignore --no-warn-script-location \
            --target "$pkgs.partial" "$CUDA_TOOLKIT_SPEC"
        mv "$pkgs.partial" "$pkgs"
        log "toolkit: downloaded and installed in $((SECONDS - t0)) s"
    fi
    layout_toolkit
    printf '%s' "$CUDA_TOOLKIT_SPEC" >"$cuda_home/.installed"
    case ",$features," in *,cudnn,*) install_cudnn ;; esac
}

# cuDNN (about 370 MB) in a folder of its own, linked into the toolkit's lib64/ under unversioned names.
install_cudnn() {
    if [ -f "$cuda_home/.installed-cudnn" ] && [ "$(cat "$cuda_home/.installed-cudnn")" = "$CUDNN_SPEC" ]; then
        log "cudnn: reusing $cuda_home/cudnn"
    else
        log "cudnn: installing $CUDNN_SPEC into $cuda_home/cudnn"
        rm -rf "$cuda_home/cudnn" "$cuda_home/cudnn.partial" "$cuda_home/.installed-cudnn"
        python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check --root-user-action=ignore --no-deps \
            --target "$cuda_home/cudnn.partial" "$CUDNN_SPEC"
        mv "$cuda_home/cudnn.partial" "$cuda_home/cudnn"
        printf '%s' "$CUDNN_SPEC" >"$cuda_home/.installed-cudnn"
    fi
    local f name
    for f in "$cuda_home"/cudnn/nvidia/cudnn/lib/*.so.*; do
        name=$(basename "$f")
        ln -sfn "$f" "$root/lib64/$name"
        ln -sfn "$f" "$root/lib64/${name%%.so.*}.so"
    done
}

# Turn the wheels' tree into a CUDA root that cudarc's and candle-kernels' (cudaforge) build scripts and the linker
# accept: lib64/ with unversioned names (the wheels ship only libcublas.so.13 etc.) and lib64/stubs/libcuda.so.
layout_toolkit() {
    [ -x "$root/bin/nvcc" ] || { log "no nvcc in $root: delete $cuda_home and rerun"; exit 1; }
    mkdir -p "$root/lib64/stubs"
    local f name
    for f in "$root"/lib/*.so.*; do
        name=$(basename "$f")
        ln -sfn "../lib/$name" "$root/lib64/$name"
        ln -sfn "../lib/$name" "$root/lib64/${name%%.so.*}.so"
    done
    # The driver library libcuda.so.1 comes with the NVIDIA driver, never with a toolkit wheel. Link against a stub
    # of empty functions with the driver's soname: the binary then records NEEDED libcuda.so.1 and the GPU machine's
    # driver provides the real one. The stub is only for linking; it is never shipped or loaded.
    local stub=$root/lib64/stubs/libcuda.so
    if [ ! -f "$stub" ] || [ "$root/include/cuda.h" -nt "$stub" ]; then
        local c=$cuda_home/libcuda_stub.c
        {
            echo '/* Link stub for libcuda.so.1, generated by scripts/build-cuda.sh from cuda.h. Never run. */'
            # Every cu* entry point, under each name that cuda.h can make it (cuX, cuX_v2, cuX_ptds, ...).
            for defs in '' '-D__CUDA_API_VERSION_INTERNAL' '-DCUDA_API_PER_THREAD_DEFAULT_STREAM'; do
                # shellcheck disable=SC2086
                cc -E -P $defs -I"$root/include" "$root/include/cuda.h"
            done | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u |
                sed 's/.*/void &(void) {}/'
        } >"$c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$c"
        log "toolkit: libcuda.so link stub with $(grep -c '^void' "$c") entry points"
    fi
    local release
    release=$("$root/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\),.*/\1/p')
    case $release in
        13.[0-4]) ;;
        *) log "nvcc release $release: cudarc accepts CUDA 13.0-13.4 only"; exit 1 ;;
    esac
}

setup_env() {
    export CUDA_ROOT=$root CUDA_PATH=$root CUDA_HOME=$root
    export NVCC=$root/bin/nvcc
    export PATH=$root/bin:$PATH
    export LIBRARY_PATH=$root/lib64:$root/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
}

cd "$repo"
case $mode in
    toolkit)
        install_toolkit
        ;;
    env)
        install_toolkit
        setup_env
        for v in CUDA_ROOT CUDA_PATH CUDA_HOME NVCC PATH LIBRARY_PATH CUDA_COMPUTE_CAP CARGO_TARGET_DIR CUDAFORGE_THREADS; do
            printf 'export %s=%q\n' "$v" "${!v}"
        done
        ;;
    clippy)
        install_toolkit
        setup_env
        cargo clippy --release --features "$features" --all-targets "$@"
        ;;
    build)
        install_toolkit
        setup_env
        log "cargo build --release --features $features (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR)"
        t0=$SECONDS
        cargo build --release --features "$features" --bin bpo "$@"
        log "built in $((SECONDS - t0)) s"
        bin=$CARGO_TARGET_DIR/release/bpo
        gzip -9 -c "$bin" >"$CARGO_TARGET_DIR/bpo-cuda.gz.partial"
        mv "$CARGO_TARGET_DIR/bpo-cuda.gz.partial" "$CARGO_TARGET_DIR/bpo-cuda.gz"
        log "binary: $bin ($(du -h "$bin" | cut -f1)), gzipped: $CARGO_TARGET_DIR/bpo-cuda.gz ($(du -h "$CARGO_TARGET_DIR/bpo-cuda.gz" | cut -f1))"
        log "shared libraries it needs at run time: $(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
        ;;
    *)
        sed -n '2,9p' "$0" >&2
        exit 2
        ;;
esac
