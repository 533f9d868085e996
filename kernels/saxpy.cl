// kaas: signature: saxpy(alpha: float32, x: float32[n], y: float32[n], out: out float32[n], n: int32)
// kaas: grid: n
// kaas: block: 64
// kaas: doc: out = alpha * x + y
__kernel void saxpy(const float alpha, __global const float *x, __global const float *y,
                    __global float *out, const int n) {
    int i = get_global_id(0);
    if (i < n) out[i] = alpha * x[i] + y[i];
}
