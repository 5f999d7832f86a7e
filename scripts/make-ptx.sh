#!/usr/bin/env bash
# Dev-only: compiles bpo's CUDA kernels (src/model/kernels/*.cu) to the PTX files checked in beside them, with the
# nvcc of the toolkit that scripts/build-cuda.sh installs (no GPU needed). PTX for compute_75, no
# architecture-specific features: the driver compiles it for the card on first use. Then checks that ptxas accepts
# it for the H100/H200 (sm_90).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
eval "$("$repo/scripts/build-cuda.sh" env)"
for cu in "$repo"/src/model/kernels/*.cu; do
    ptx=${cu%.cu}.ptx
    nvcc --ptx -arch=compute_75 -O3 -o "$ptx" "$cu"
    ptxas -arch=sm_90 -o /dev/null "$ptx"
    echo "$ptx: $(wc -c <"$ptx") bytes, ptxas sm_90 ok"
done
