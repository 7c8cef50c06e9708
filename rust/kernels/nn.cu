// Layer kernels of the LLaMA forward and backward (f32 buffers), one concept each, in
// the same operation order as rust/src/backend/cpu/ops.rs.

extern "C" __global__ void fill(float* x, float v, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) x[j] = v;
}

extern "C" __global__ void axpy(float* dst, float alpha, const float* src, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) dst[j] += alpha * src[j];
}

extern "C" __global__ void scale(float* x, float s, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) x[j] *= s;
}

// out[i, :] = table[tokens[i], :]; grid (rows, ceil(c/256)): rows on x, which has no
// 65535 limit
extern "C" __global__ void embedding(float* out, const int* tokens, const float* table, int c) {
    int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= c) return;
    u64 row = blockIdx.x;
    out[row * c + col] = table[(u64)tokens[row] * c + col];
}

// dtable[tokens[i], :] += dout[i, :]: one thread per column walks the rows in order
// (deterministic, and the CPU's summation order).
extern "C" __global__ void embedding_bwd(float* dtable, const float* dout, const int* tokens,
                                         int rows, int c) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= c) return;
    for (int r = 0; r < rows; r++) dtable[(u64)tokens[r] * c + col] += dout[(u64)r * c + col];
}

// One block per row.
extern "C" __global__ void rmsnorm(float* out, float* rstd, const float* x, const float* w,
                                   int c, float eps) {
    __shared__ float red[32];
    const float* xr = x + (u64)blockIdx.x * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss, red);
    float s = 1.0f / sqrtf(ss / (float)c + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = s;
    for (int j = threadIdx.x; j < c; j += blockDim.x) out[(u64)blockIdx.x * c + j] = w[j] * (xr[j] * s);
}

// dx += r·g − x·r³·mean(x ⊙ g) with g = dout ⊙ w; one block per row.
extern "C" __global__ void rmsnorm_bwd_dx(float* dx, const float* dout, const float* x,
                                          const float* w, const float* rstd, int c) {
    __shared__ float red[32];
    u64 base = (u64)blockIdx.x * c;
    float r = rstd[blockIdx.x];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dot += x[base + j] * dout[base + j] * w[j];
    dot = block_sum(dot, red);
    float k = r * r * r * dot / (float)c;
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        dx[base + j] += r * dout[base + j] * w[j] - x[base + j] * k;
}

// dw[j] += Σ_rows dout·x·r, one thread per column, rows in order.
extern "C" __global__ void rmsnorm_bwd_dw(float* dw, const float* dout, const float* x,
                                          const float* rstd, int rows, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float acc = dw[j];
    for (int i = 0; i < rows; i++) acc += dout[(u64)i * c + j] * x[(u64)i * c + j] * rstd[i];
    dw[j] = acc;
}

// Rotate-half RoPE in place on (b·t rows, heads, hd); table = [cos(t×hd/2), sin(t×hd/2)].
// grid (rows, heads), block hd/2.
extern "C" __global__ void rope(float* x, const float* table, int t, int heads, int hd, int inverse) {
    int half = hd / 2, i = threadIdx.x;
    if (i >= half) return;
    int row = blockIdx.x, head = blockIdx.y, p = row % t;
    float c = table[p * half + i], s = table[t * half + p * half + i];
    if (inverse) s = -s;
    float* h = x + ((u64)row * heads + head) * hd;
    float a = h[i], b = h[i + half];
    h[i] = a * c - b * s;
    h[i + half] = b * c + a * s;
}

extern "C" __global__ void swiglu(float* out, const float* gate, const float* up, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float g = gate[j];
    out[j] = g * (1.0f / (1.0f + expf(-g))) * up[j];
}

extern "C" __global__ void swiglu_bwd(float* dgate, float* dup, const float* dout,
                                      const float* gate, const float* up, u64 n) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float g = gate[j], u = up[j], d = dout[j];
    float s = 1.0f / (1.0f + expf(-g));
    dgate[j] = d * u * s * (1.0f + g * (1.0f - s));
    dup[j] = d * g * s;
}

// Causal softmax in place on (b·h) blocks of t×t scores; one block per score row.
extern "C" __global__ void causal_softmax(float* att, int t) {
    __shared__ float red[32];
    u64 row = blockIdx.x;
    int ti = (int)(row % t);
    float* a = att + row * t;
    float mx = __int_as_float(0xff800000);
    for (int s = threadIdx.x; s <= ti; s += blockDim.x) mx = fmaxf(mx, a[s]);
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int s = threadIdx.x; s <= ti; s += blockDim.x) { float e = expf(a[s] - mx); a[s] = e; sum += e; }
    sum = block_sum(sum, red);
    float inv = 1.0f / sum;
    for (int s = threadIdx.x; s < t; s += blockDim.x) a[s] = s <= ti ? a[s] * inv : 0.0f;
}

// ds = att ⊙ (datt − Σ datt⊙att) · scale on the causal part, in place on datt.
extern "C" __global__ void causal_softmax_bwd(float* datt, const float* att, int t, float scale) {
    __shared__ float red[32];
    u64 row = blockIdx.x;
    int ti = (int)(row % t);
    const float* a = att + row * t;
    float* d = datt + row * t;
    float dot = 0.0f;
    for (int s = threadIdx.x; s <= ti; s += blockDim.x) dot += a[s] * d[s];
    dot = block_sum(dot, red);
    for (int s = threadIdx.x; s < t; s += blockDim.x) d[s] = s <= ti ? a[s] * (d[s] - dot) * scale : 0.0f;
}

// Fused softmax cross-entropy: per-row loss, and with grad != 0 the logits are
// overwritten by grad_scale·(softmax − onehot). One block per row.
extern "C" __global__ void cross_entropy(float* logits, const int* targets, float* losses, int v,
                                         int grad, float grad_scale) {
    __shared__ float red[32];
    float* z = logits + (u64)blockIdx.x * v;
    int tgt = targets[blockIdx.x];
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
