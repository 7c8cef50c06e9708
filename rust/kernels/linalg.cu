// Projector helpers around cuSOLVER's symmetric eigensolver (eigenvalues ascending,
// eigenvectors as the columns of the column-major n×n output).

// Right projector: rows i < k of out (k×n) = eigenvector n−1−i.
extern "C" __global__ void top_eigvecs_rows(float* out, const float* a, int n, int k) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
    if (x < n && i < k) out[(u64)i * n + x] = a[(u64)(n - 1 - i) * n + x];
}

// Left projector: columns i < k of out (n×k) = eigenvector n−1−i.
extern "C" __global__ void top_eigvecs_cols(float* out, const float* a, int n, int k) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
    if (x < n && i < k) out[(u64)x * k + i] = a[(u64)(n - 1 - i) * n + x];
}

// out (cols×rows) = inᵀ for a row-major rows×cols matrix; grid covers rows·cols.
extern "C" __global__ void transpose(float* out, const float* in, int rows, int cols) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * cols) return;
    u64 r = i / cols, c = i % cols;
    out[c * rows + r] = in[i];
}
