// QLoRA's frozen NF4 base (rust/src/quant/nf4.rs): dequantization of a row range of a
// double-quantized NF4 tensor into the GEMM operand, bit-identical to
// `Nf4Tensor::dequantize_rows` when compiled with --fmad=false (the block constant is a
// multiply then an add, never fused, as the CPU computes it).
//
// Layout (nf4.rs): element k's code is the HIGH nibble of codes[k/2] when k is even, the
// low nibble when odd; block j = k/64 has the constant
//     absmax_j = dyn[qabsmax[j]] · absmax2[j/256] + offset
// and w_k = NF4[code_k] · absmax_j. `tables` holds the 16 NF4 levels then the 256 entries of
// bnb's signed dynamic map (nf4::kernel_tables, uploaded once per backend), so the values
// have one owner, the Rust side.

#define NF4_BLOCK 64
#define NF4_DQ_BLOCK 256
#define NF4_DYN 16 // offset of the dynamic map in `tables`

__device__ __forceinline__ float nf4_value(const u8* codes, const u8* qabsmax, const float* absmax2,
                                           const float* tables, float offset, u64 k) {
    u64 j = k / NF4_BLOCK;
    float am = __ldg(&tables[NF4_DYN + qabsmax[j]]) * absmax2[j / NF4_DQ_BLOCK] + offset;
    int q = (codes[k >> 1] >> ((k & 1) ? 0 : 4)) & 0xf;
    return __ldg(&tables[q]) * am;
}

// out[i] = w[start + i] for i < n: elements [start, start + n) of the flattened tensor (rows
// [r0, r1) of a [rows, cols] weight are start = r0·cols, n = (r1 − r0)·cols); grid covers n.
extern "C" __global__ void nf4_dequant(float* out, const u8* codes, const u8* qabsmax,
                                       const float* absmax2, const float* tables, float offset,
                                       u64 start, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = nf4_value(codes, qabsmax, absmax2, tables, offset, start + i);
}

// The same values rounded to bf16 (RNE): the GEMM operand of the bf16 precision, as an
// upload of the f32 values into a bf16 buffer rounds them.
extern "C" __global__ void nf4_dequant_bf16(bf16_t* out, const u8* codes, const u8* qabsmax,
                                            const float* absmax2, const float* tables,
                                            float offset, u64 start, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = f32_to_bf16(nf4_value(codes, qabsmax, absmax2, tables, offset, start + i));
}
