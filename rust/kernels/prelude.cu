// Shared definitions, prepended by the engine to every kernel module before NVRTC
// compiles it (kernels stay header-free: no include path is needed at run time).
// The random-number functions are bit-identical to rust/src/rng.rs.

typedef unsigned char u8;
typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((u32)h) << 16); }

// round-to-nearest-even, quiet NaN kept (quant::f32_to_bf16)
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// splitmix64 finaliser of seed + golden·(i + 1)  (rng::mix64)
__device__ __forceinline__ u64 mix64(u64 seed, u64 i) {
    u64 z = seed + 0x9e3779b97f4a7c15ull * (i + 1ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// uniform in [0, 1) with 24 bits (rng::uniform)
__device__ __forceinline__ float uniform24(u64 key, u64 i) {
    u32 b = (u32)(mix64(key, i) >> 32);
    return (float)(b >> 8) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reduction (sum or max) in a fixed order: deterministic for a given block
// size. Every thread of the block must call it; blockDim.x must be a multiple of 32.
template <bool MAX>
__device__ float block_reduce(float v, float* shared) {
    float neutral = MAX ? __int_as_float(0xff800000) : 0.0f;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // NaN → −∞ first: an all-NaN input gives −∞ like the CPU's fold from −∞, whatever the
    // block size (fmaxf only drops a NaN when the other operand is not one)
    if (MAX) v = fmaxf(v, neutral);
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? shared[threadIdx.x] : neutral;
    if (warp == 0) v = MAX ? warp_max(v) : warp_sum(v);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}

__device__ __forceinline__ float block_sum(float v, float* shared) { return block_reduce<false>(v, shared); }
__device__ __forceinline__ float block_max(float v, float* shared) { return block_reduce<true>(v, shared); }

__device__ __forceinline__ bool finite_f(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
