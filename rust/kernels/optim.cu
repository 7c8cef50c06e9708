// Optimizer kernels, bit-identical to rust/src/backend/cpu/ops.rs and
// rust/src/quant/adam8.rs when compiled with --fmad=false.

// torch.optim.AdamW (ops::adamw)
extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, float step,
                                 float rbc2, float decay, float b1, float b2, float eps, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float gj = g[j];
    float mj = b1 * m[j] + (1.0f - b1) * gj;
    float vj = b2 * v[j] + (1.0f - b2) * gj * gj;
    m[j] = mj;
    v[j] = vj;
    p[j] = p[j] * decay - step * mj / (sqrtf(vj) * rbc2 + eps);
}

// GaLore-AdamW in place (ops::galore_adam): buf holds the gradient, receives −ŝ·M/(√V+ε)
extern "C" __global__ void galore_adam(float* buf, float* m, float* v, float s, float b1,
                                       float b2, float eps, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float g = buf[j];
    m[j] = b1 * m[j] + (1.0f - b1) * g;
    v[j] = b2 * v[j] + (1.0f - b2) * g * g;
    buf[j] = -s * m[j] / (sqrtf(v[j]) + eps);
}

// Weights of the bnb steps: f32, or bf16 storage (embedding and head under the bf16
// precision, as the reference keeps them): the update runs in f32 and is rounded to
// nearest even once, exactly the CPU's f32 step followed by quant::f32_to_bf16.
__device__ __forceinline__ float wld(const float* p, u64 j) { return p[j]; }
__device__ __forceinline__ void wst(float* p, u64 j, float v) { p[j] = v; }
__device__ __forceinline__ float wld(const bf16_t* p, u64 j) { return bf16_to_f32(p[j]); }
__device__ __forceinline__ void wst(bf16_t* p, u64 j, float v) { p[j] = f32_to_bf16(v); }

// bnb kOptimizer32bit2State (adam8::step32); skipped counts non-finite gradients
template <typename W>
__device__ void bnb32_body(W* p, const float* g, float* m, float* v, float step_size, float eps2,
                           float b1, float b2, float wd, float decay,
                           unsigned long long* skipped, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float gj = g[j];
    if (!finite_f(gj)) { atomicAdd(skipped, 1ull); return; }
    m[j] = b1 * m[j] + (1.0f - b1) * gj;
    v[j] = b2 * v[j] + (1.0f - b2) * gj * gj;
    float pj = wld(p, j);
    pj += step_size * (m[j] / (sqrtf(v[j]) + eps2));
    if (wd > 0.0f) pj *= decay;
    wst(p, j, pj);
}

extern "C" __global__ void bnb32(float* p, const float* g, float* m, float* v, float step_size,
                                 float eps2, float b1, float b2, float wd, float decay,
                                 unsigned long long* skipped, u64 n) {
    bnb32_body(p, g, m, v, step_size, eps2, b1, b2, wd, decay, skipped, n);
}

extern "C" __global__ void bnb32_w16(bf16_t* p, const float* g, float* m, float* v,
                                     float step_size, float eps2, float b1, float b2, float wd,
                                     float decay, unsigned long long* skipped, u64 n) {
    bnb32_body(p, g, m, v, step_size, eps2, b1, b2, wd, decay, skipped, n);
}

__device__ __forceinline__ u32 nearest_code(const float* map, float x, int sign) {
    u32 i = 0;
    for (u32 step = 128; step > 0; step >>= 1) {
        u32 j = i + step;
        i += step * (u32)(x - map[j - 1] > map[j] - x);
    }
    if (sign) {
        if (x > 0.0f && map[i] < 0.0f && i < 255) i += 1;
        else if (x < 0.0f && map[i] > 0.0f && i > 0) i -= 1;
    }
    return i;
}

// bnb kOptimizerStatic8bit2StateBlockwise (adam8::step8): one thread block per state
// block of `bs` elements (bs ≤ quant::adam8::MAX_BLOCK); each thread handles ITEMS elements
// (launch::ADAM8_ITEMS, defined by kernels::size_defines).
#define ITEMS QG_ADAM8_ITEMS
template <typename W>
__device__ void adam8_body(W* p, const float* g, u8* cm, u8* cv, float* absm, float* absv,
                           const float* smap, const float* umap, float step_size, float eps2,
                           float b1, float b2, float wd, float decay, int bs,
                           unsigned long long* skipped, u64 n) {
    __shared__ float red[32];
    __shared__ float sm[256], um[256];
    for (int k = threadIdx.x; k < 256; k += blockDim.x) { sm[k] = smap[k]; um[k] = umap[k]; }
    __syncthreads();
    u64 base = (u64)blockIdx.x * bs;
    float am = absm[blockIdx.x], av = absv[blockIdx.x];
    float mv[ITEMS], vv[ITEMS];
    float nm = 0.0f, nv = 0.0f;
    unsigned long long skip = 0;
    for (int k = 0; k < ITEMS; k++) {
        int off = threadIdx.x + k * blockDim.x;
        u64 j = base + off;
        mv[k] = 0.0f; vv[k] = 0.0f;
        if (off >= bs || j >= n) continue;
        float gj = g[j];
        float mj = sm[cm[j]] * am, vj = um[cv[j]] * av;
        if (finite_f(gj)) {
            mj = b1 * mj + (1.0f - b1) * gj;
            vj = b2 * vj + (1.0f - b2) * gj * gj;
            float pj = wld(p, j);
            pj += step_size * (mj / (sqrtf(vj) + eps2));
            if (wd > 0.0f) pj *= decay;
            wst(p, j, pj);
        } else {
            mj = 0.0f; vj = 0.0f; skip++;
        }
        mv[k] = mj; vv[k] = vj;
        nm = fmaxf(nm, fabsf(mj));
        nv = fmaxf(nv, fabsf(vj));
    }
    if (skip) atomicAdd(skipped, skip);
    nm = block_max(nm, red);
    nv = block_max(nv, red);
    if (threadIdx.x == 0) { absm[blockIdx.x] = nm; absv[blockIdx.x] = nv; }
    float im = nm > 0.0f ? 1.0f / nm : 0.0f, iv = nv > 0.0f ? 1.0f / nv : 0.0f;
    for (int k = 0; k < ITEMS; k++) {
        int off = threadIdx.x + k * blockDim.x;
        u64 j = base + off;
        if (off >= bs || j >= n) continue;
        cm[j] = (u8)nearest_code(sm, mv[k] * im, 1);
        cv[j] = (u8)nearest_code(um, vv[k] * iv, 0);
    }
}

extern "C" __global__ void adam8(float* p, const float* g, u8* cm, u8* cv, float* absm,
                                 float* absv, const float* smap, const float* umap, float step_size,
                                 float eps2, float b1, float b2, float wd, float decay, int bs,
                                 unsigned long long* skipped, u64 n) {
    adam8_body(p, g, cm, cv, absm, absv, smap, umap, step_size, eps2, b1, b2, wd, decay, bs,
               skipped, n);
}

extern "C" __global__ void adam8_w16(bf16_t* p, const float* g, u8* cm, u8* cv, float* absm,
                                     float* absv, const float* smap, const float* umap,
                                     float step_size, float eps2, float b1, float b2, float wd,
                                     float decay, int bs, unsigned long long* skipped, u64 n) {
    adam8_body(p, g, cm, cv, absm, absv, smap, umap, step_size, eps2, b1, b2, wd, decay, bs,
               skipped, n);
}

// Zeroes non-finite elements and counts them.
extern "C" __global__ void sanitize(float* x, unsigned long long* count, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n && !finite_f(x[j])) { x[j] = 0.0f; atomicAdd(count, 1ull); }
}

// Σ x² in f64, stage 1: one partial per block over a fixed grid-stride (deterministic
// for a fixed grid); stage 2 sums the partials in order on one thread.
extern "C" __global__ void sumsq_partial(const float* x, double* part, u64 n) {
    __shared__ double red[QG_SUMSQ_THREADS]; // launch::SUMSQ_THREADS, defined by kernels::size_defines
    double acc = 0.0;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (u64)gridDim.x * blockDim.x) {
        double v = (double)x[j];
        acc += v * v;
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = red[0];
}

// *out = Σ part, or *out += Σ part with `acc` (a running total read once per step).
extern "C" __global__ void sum_partials(const double* part, double* out, int parts, int acc) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        double s = 0.0;
        for (int i = 0; i < parts; i++) s += part[i];
        *out = acc ? *out + s : s;
    }
}
