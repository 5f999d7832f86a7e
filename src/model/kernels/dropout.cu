// LoRA dropout on the GPU: element i of a contiguous tensor is kept (and scaled by 1 / (1 - p)) when a uniform draw
// from a counter-based hash of (i, seed) is at least p. The same hash as `keep` in src/model/generic.rs, so the CPU
// and the GPU draw the same masks. Compiled to PTX by scripts/make-ptx.sh (dev-only; the PTX is checked in).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// lowbias32 (C. Wellons).
__device__ __forceinline__ unsigned int mix32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    return x ^ (x >> 16);
}

__device__ __forceinline__ float keep_scale(unsigned int i, unsigned int k1, unsigned int k2, float p, float scale) {
    float u = (float)(mix32(mix32(i + k1) ^ k2) >> 8) * (1.0f / 16777216.0f);
    return u >= p ? scale : 0.0f;
}

extern "C" __global__ void bpo_dropout_f32(const float *x, float *y, unsigned int n, unsigned int k1, unsigned int k2,
                                           float p, float scale) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        float s = keep_scale(i, k1, k2, p, scale);
        y[i] = s == 0.0f ? 0.0f : x[i] * s;
    }
}

extern "C" __global__ void bpo_dropout_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *y, unsigned int n, unsigned int k1,
                                            unsigned int k2, float p, float scale) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        float s = keep_scale(i, k1, k2, p, scale);
        y[i] = __float2bfloat16(s == 0.0f ? 0.0f : __bfloat162float(x[i]) * s);
    }
}

extern "C" __global__ void bpo_dropout_f16(const __half *x, __half *y, unsigned int n, unsigned int k1, unsigned int k2,
                                           float p, float scale) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        float s = keep_scale(i, k1, k2, p, scale);
        y[i] = __float2half(s == 0.0f ? 0.0f : __half2float(x[i]) * s);
    }
}
