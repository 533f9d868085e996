// kaas: signature: reduce_sum(a: float32[n], partial: out float32[cdiv(n, 256)], n: int32)
// kaas: grid: cdiv(n, 256) * 256
// kaas: block: 256
// kaas: post: sum
// kaas: doc: sum of a; each work-group reduces 256 elements in local memory, then the partial sums are added on the device
__kernel void reduce_sum(__global const float *a, __global float *partial, const int n) {
    __local float scratch[256];
    int i = get_global_id(0), l = get_local_id(0);
    scratch[l] = i < n ? a[i] : 0.0f;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = get_local_size(0) / 2; s > 0; s >>= 1) {
        if (l < s) scratch[l] += scratch[l + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (l == 0) partial[get_group_id(0)] = scratch[0];
}
