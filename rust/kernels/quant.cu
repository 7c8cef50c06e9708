// Group quantization (docs/algorithm-spec.md §2.2–2.4), bit-identical to rust/src/quant/mod.rs
// when compiled with --fmad=false: one thread block per group (group ≤ QG_MAX_GROUP = quant::MAX_GROUP elements).

__device__ __forceinline__ void group_params(float lo, float hi, float qmax, int with_zero,
                                             float* s, float* z) {
    if (with_zero) { lo = fminf(lo, 0.0f); hi = fmaxf(hi, 0.0f); }
    float sv = fmaxf(hi - lo, 1e-5f) / qmax;
    float zv = rintf(-(lo / sv));
    *s = sv;
    // Rust's clamp keeps −0.0 (fmaxf may not): same bytes as the CPU's zero points
    *z = zv < 0.0f ? 0.0f : (zv > qmax ? qmax : zv);
}

__device__ __forceinline__ u8 round_code(float x, float z, float qmax, int sr, u64 key, u64 idx) {
    float r;
    if (sr) {
        float f = floorf(x);
        r = (uniform24(key, idx) < x - f) ? f + 1.0f : f;
    } else {
        r = rintf(x);
    }
    return (u8)fminf(fmaxf(r + z, 0.0f), qmax);
}

__device__ __forceinline__ int code_at(const u8* codes, int bits, u64 i) {
    return bits == 8 ? codes[i] : (codes[i >> 1] >> ((i & 1) * 4)) & 0xf;
}

// out[i] = (q − z)·s for 4- and 8-bit codes; grid covers n elements.
extern "C" __global__ void q_dequant(float* out, const u8* codes, const float* scale,
                                     const float* zero, int bits, int group, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u64 g = i / group;
    out[i] = ((float)code_at(codes, bits, i) - zero[g]) * scale[g];
}

// The same values rounded to bf16 (RNE): the GEMM operand of the bf16 precision.
extern "C" __global__ void q_dequant_bf16(bf16_t* out, const u8* codes, const float* scale,
                                          const float* zero, int bits, int group, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u64 g = i / group;
    out[i] = f32_to_bf16(((float)code_at(codes, bits, i) - zero[g]) * scale[g]);
}

extern "C" __global__ void bf16_dequant(float* out, const bf16_t* codes, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf16_to_f32(codes[i]);
}

extern "C" __global__ void bf16_quant(bf16_t* codes, const float* src, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) codes[i] = f32_to_bf16(src[i]);
}

// Quantizes one group per block: w = src (+ delta, · decay when `update`), fresh scale
// and zero, codes rounded to nearest or stochastically (keyed by element index).
// blockDim.x is `group` rounded up to whole warps (the reductions shuffle full warps);
// the extra threads only contribute neutral values. 4-bit codes are packed through
// shared memory.
extern "C" __global__ void q_requant(u8* codes, float* scale, float* zero, const float* src,
                                     const float* delta, float decay, int update, int bits,
                                     int with_zero, int sr, u64 key, int group) {
    __shared__ float red[32];
    __shared__ u8 packed[QG_MAX_GROUP]; // quant::MAX_GROUP, defined by kernels::size_defines
    int g = blockIdx.x, j = threadIdx.x;
    bool live = j < group;
    u64 i = (u64)g * group + j;
    float qmax = (float)((1 << bits) - 1);
    float w = 0.0f;
    if (live) {
        if (update) {
            float v = ((float)code_at(codes, bits, i) - zero[g]) * scale[g] + delta[i];
            w = (decay != 1.0f) ? v * decay : v;
        } else {
            w = src[i];
        }
    }
    __syncthreads(); // every thread has read its old code before any is rewritten
    float neg_inf = __int_as_float(0xff800000);
    float lo = -block_max(live ? -w : neg_inf, red);
    float hi = block_max(live ? w : neg_inf, red);
    float s, z;
    group_params(lo, hi, qmax, with_zero, &s, &z);
    u8 q = live ? round_code(w / s, z, qmax, sr, key, i) : 0;
    if (j == 0) { scale[g] = s; zero[g] = z; }
    if (bits == 8) {
        if (live) codes[i] = q;
    } else {
        packed[j] = q;
        __syncthreads();
        if (live && (j & 1) == 0) codes[i >> 1] = (u8)(packed[j] | (packed[j + 1] << 4));
    }
}
