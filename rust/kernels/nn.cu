// Layer kernels of the LLaMA forward and backward, one concept each, in the same
// operation order as rust/src/backend/cpu/ops.rs. Activations have type `act_t`: f32 by
// default, bf16 when the module is compiled with -DQG_BF16 (the engine's bf16 precision).
// Math is always f32; `ld`/`st` convert at the memory boundary (RNE on store). Weights,
// gradients of parameters, RMSNorm statistics, RoPE tables and logits stay f32.

#ifdef QG_BF16
typedef bf16_t act_t;
__device__ __forceinline__ float ld(const act_t* p, u64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(act_t* p, u64 i, float v) { p[i] = f32_to_bf16(v); }
#else
typedef float act_t;
__device__ __forceinline__ float ld(const act_t* p, u64 i) { return p[i]; }
__device__ __forceinline__ void st(act_t* p, u64 i, float v) { p[i] = v; }
#endif

extern "C" __global__ void fill(float* x, float v, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) x[j] = v;
}

extern "C" __global__ void fill_act(act_t* x, float v, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) st(x, j, v);
}

extern "C" __global__ void axpy(float* dst, float alpha, const float* src, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) dst[j] += alpha * src[j];
}

extern "C" __global__ void scale(float* x, float s, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) x[j] *= s;
}

// out[i, :] = table[tokens[i], :]; grid launch::token_rows (rows, then c in blocks of
// launch::THREADS): rows on x, which has no 65535 limit
extern "C" __global__ void embedding(act_t* out, const int* tokens, const float* table, int c) {
    int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= c) return;
    u64 row = blockIdx.x;
    st(out, row * c + col, table[(u64)tokens[row] * c + col]);
}

// The same lookup from a bf16 table (embedding weights stored in bf16).
extern "C" __global__ void embedding_w16(act_t* out, const int* tokens, const bf16_t* table, int c) {
    int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= c) return;
    u64 row = blockIdx.x;
    st(out, row * c + col, bf16_to_f32(table[(u64)tokens[row] * c + col]));
}

// dtable[tokens[i], :] += dout[i, :], grouped by token on the host (plan::token_groups):
// block (u, column block) adds the rows order[starts[u]..starts[u+1]] of token uniq[u] in
// row order, the CPU's summation order, so the result is deterministic and identical.
extern "C" __global__ void embedding_bwd(float* dtable, const act_t* dout, const int* uniq,
                                         const int* starts, const int* order, int c) {
    int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= c) return;
    int u = blockIdx.x;
    float* dst = dtable + (u64)uniq[u] * c + col;
    float acc = *dst;
    for (int i = starts[u]; i < starts[u + 1]; i++) acc += ld(dout, (u64)order[i] * c + col);
    *dst = acc;
}

// One block per row.
extern "C" __global__ void rmsnorm(act_t* out, float* rstd, const act_t* x, const float* w,
                                   int c, float eps) {
    __shared__ float red[32];
    u64 base = (u64)blockIdx.x * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) { float v = ld(x, base + j); ss += v * v; }
    ss = block_sum(ss, red);
    float s = 1.0f / sqrtf(ss / (float)c + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = s;
    for (int j = threadIdx.x; j < c; j += blockDim.x) st(out, base + j, w[j] * (ld(x, base + j) * s));
}

// dx += r·g − x·r³·mean(x ⊙ g) with g = dout ⊙ w; one block per row.
extern "C" __global__ void rmsnorm_bwd_dx(act_t* dx, const act_t* dout, const act_t* x,
                                          const float* w, const float* rstd, int c) {
    __shared__ float red[32];
    u64 base = (u64)blockIdx.x * c;
    float r = rstd[blockIdx.x];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dot += ld(x, base + j) * ld(dout, base + j) * w[j];
    dot = block_sum(dot, red);
    float k = r * r * r * dot / (float)c;
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        st(dx, base + j, ld(dx, base + j) + (r * ld(dout, base + j) * w[j] - ld(x, base + j) * k));
}

// dw[j] += Σ_rows dout·x·r in two deterministic stages, so that thousands of rows do not
// run serially on one thread per column: grid launch::rmsnorm_dw_part (c in blocks of
// launch::THREADS, then chunks of rows) writes the partial sum of each chunk of rows (rows
// in order), then one thread per column adds the chunks in order.
extern "C" __global__ void rmsnorm_bwd_dw_part(float* part, const act_t* dout, const act_t* x,
                                               const float* rstd, int rows, int c, int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    int r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
    float acc = 0.0f;
    for (int i = r0; i < r1; i++) acc += ld(dout, (u64)i * c + j) * ld(x, (u64)i * c + j) * rstd[i];
    part[(u64)blockIdx.y * c + j] = acc;
}

extern "C" __global__ void rmsnorm_bwd_dw_sum(float* dw, const float* part, int chunks, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float acc = dw[j];
    for (int k = 0; k < chunks; k++) acc += part[(u64)k * c + j];
    dw[j] = acc;
}

// Rotate-half RoPE in place on (b·t rows, heads, hd); table = [cos(t×hd/2), sin(t×hd/2)].
// grid (rows, heads), block hd/2.
extern "C" __global__ void rope(act_t* x, const float* table, int t, int heads, int hd, int inverse) {
    int half = hd / 2, i = threadIdx.x;
    if (i >= half) return;
    int row = blockIdx.x, head = blockIdx.y, p = row % t;
    float c = table[p * half + i], s = table[t * half + p * half + i];
    if (inverse) s = -s;
    act_t* h = x + ((u64)row * heads + head) * hd;
    float a = ld(h, i), b = ld(h, i + half);
    st(h, i, a * c - b * s);
    st(h, i + half, b * c + a * s);
}

extern "C" __global__ void swiglu(act_t* out, const act_t* gate, const act_t* up, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float g = ld(gate, j);
    st(out, j, g * (1.0f / (1.0f + expf(-g))) * ld(up, j));
}

extern "C" __global__ void swiglu_bwd(act_t* dgate, act_t* dup, const act_t* dout,
                                      const act_t* gate, const act_t* up, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float g = ld(gate, j), u = ld(up, j), d = ld(dout, j);
    float s = 1.0f / (1.0f + expf(-g));
    st(dgate, j, d * u * s * (1.0f + g * (1.0f - s)));
    st(dup, j, d * g * s);
}

// Causal softmax in place on (b·h) blocks of t×t scores; one block per score row.
// The exponentials are recomputed in the last pass rather than stored, so a bf16 buffer
// rounds each probability once.
extern "C" __global__ void causal_softmax(act_t* att, int t) {
    __shared__ float red[32];
    u64 row = blockIdx.x;
    int ti = (int)(row % t);
    act_t* a = att + row * t;
    float mx = __int_as_float(0xff800000);
    for (int s = threadIdx.x; s <= ti; s += blockDim.x) mx = fmaxf(mx, ld(a, s));
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int s = threadIdx.x; s <= ti; s += blockDim.x) sum += expf(ld(a, s) - mx);
    sum = block_sum(sum, red);
    float inv = 1.0f / sum;
    for (int s = threadIdx.x; s < t; s += blockDim.x) st(a, s, s <= ti ? expf(ld(a, s) - mx) * inv : 0.0f);
}

// ds = att ⊙ (datt − Σ datt⊙att) · scale on the causal part, in place on datt.
extern "C" __global__ void causal_softmax_bwd(act_t* datt, const act_t* att, int t, float scale) {
    __shared__ float red[32];
    u64 row = blockIdx.x;
    int ti = (int)(row % t);
    const act_t* a = att + row * t;
    act_t* d = datt + row * t;
    float dot = 0.0f;
    for (int s = threadIdx.x; s <= ti; s += blockDim.x) dot += ld(a, s) * ld(d, s);
    dot = block_sum(dot, red);
    for (int s = threadIdx.x; s < t; s += blockDim.x)
        st(d, s, s <= ti ? ld(a, s) * (ld(d, s) - dot) * scale : 0.0f);
}

// Fused softmax cross-entropy: per-row loss, and with grad != 0 the logits are
// overwritten by grad_scale·(softmax − onehot). One block per row.
extern "C" __global__ void cross_entropy(float* logits, const int* targets, float* losses, int v,
                                         int grad, float grad_scale) {
    __shared__ float red[32];
    float* z = logits + (u64)blockIdx.x * v;
    int tgt = targets[blockIdx.x];
    // An ignored target (< 0: masked out of the loss) gives loss 0 and gradient 0; the
    // branch is the same for the whole block, so no thread skips a barrier.
    if (tgt < 0) {
        if (threadIdx.x == 0) losses[blockIdx.x] = 0.0f;
        if (grad)
            for (int j = threadIdx.x; j < v; j += blockDim.x) z[j] = 0.0f;
        return;
    }
    float mx = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, z[j]);
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(z[j] - mx);
    sum = block_sum(sum, red);
    float zt = z[tgt];
    if (threadIdx.x == 0) losses[blockIdx.x] = mx + logf(sum) - zt;
    __syncthreads();
    if (grad) {
        float inv = 1.0f / sum;
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            float p = expf(z[j] - mx) * inv * grad_scale;
            z[j] = (j == tgt) ? p - grad_scale : p;
        }
    }
}
