// Kernels with known defects (and some without), compiled by tests/kernel_emu/harness.rs like a
// module of rust/kernels, to show that the emulator catches what it promises to catch
// (tests/kernel_emu/selftest.rs). Uses PRELUDE's block_sum.
extern "C" __global__ void shift_missing_barrier(float* x) {
    __shared__ float s[256];
    s[threadIdx.x] = x[threadIdx.x];
    // no __syncthreads(): a thread may read its neighbour's slot before it is written
    x[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
extern "C" __global__ void shift(float* x) {
    __shared__ float s[256];
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
// block b reads what block b - 1 wrote: the result depends on the order of the blocks
extern "C" __global__ void block_chain(float* x) {
    if (threadIdx.x == 0 && blockIdx.x > 0) x[blockIdx.x] += x[blockIdx.x - 1];
}
// half of warp 0 waits at the block barrier, the other half in a shuffle
extern "C" __global__ void divergent_sync(float* x) {
    if (threadIdx.x < 16) __syncthreads();
    else x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}
// threads that return early drop out of later barriers
extern "C" __global__ void early_exit(float* x) {
    __shared__ float s[64];
    if (threadIdx.x >= 40) return;
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = s[39 - threadIdx.x];
}
extern "C" __global__ void write_before(float* x) {
    if (threadIdx.x == 0) x[-1] = 1.0f;
}
extern "C" __global__ void warp_reduce(float* x) {
    __shared__ float red[32];
    x[threadIdx.x] = block_sum(x[threadIdx.x], red);
}
// lane 5 returns, the rest of its warp shuffles with a full mask
extern "C" __global__ void shuffle_after_return(float* x) {
    if (threadIdx.x == 5) return;
    x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}
