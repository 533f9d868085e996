// kaas: signature: saxpy(alpha: float32, x: float32[n], y: float32[n], out: out float32[n], n: int32)
// kaas: grid: n
// kaas: block: 256
// kaas: doc: out = alpha * x + y
extern "C" __global__ void saxpy(const float alpha, const float *x, const float *y,
                                 float *out, const int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = alpha * x[i] + y[i];
}
