// Top-k indices of each row of logits: one invocation per row scans the vocabulary and keeps a
// sorted list of the k largest in private memory (descending value; ties to the lower index, as
// torch.topk on CPU and argmax do). Writes k u32 indices per row to out[(row_base + r) · k ..].
//
// Specialized by the host: K (1..=64).

struct Params {
    rows: u32,
    v: u32,        // vocabulary (row length)
    row_base: u32, // index of row 0 of this chunk in out
    c_begin: u32,  // columns [c_begin, c_end) are scanned by this dispatch; the top k of
    c_end: u32,    // the columns before c_begin are already in out (indices, descending)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> z: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

const K: u32 = {{K}}u;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x + gid.y * 65535u * 64u;
    if (r >= p.rows) {
        return;
    }
    var val: array<f32, K>;
    var idx: array<u32, K>;
    var have = min(p.c_begin, K);
    let base = r * p.v;
    let o = (p.row_base + r) * K;
    for (var i = 0u; i < have; i = i + 1u) {
        idx[i] = out[o + i];
        val[i] = z[base + idx[i]];
    }
    for (var j = p.c_begin; j < p.c_end; j = j + 1u) {
        let x = z[base + j];
        // Skip unless it beats the current k-th (strictly: equal values keep the earlier index).
        if (have == K && !(x > val[K - 1u])) {
            continue;
        }
        var pos = min(have, K - 1u);
        if (have < K) {
            have = have + 1u;
        }
        // Shift smaller entries down; stop below the first entry ≥ x.
        loop {
            if (pos == 0u || !(x > val[pos - 1u])) {
                break;
            }
            val[pos] = val[pos - 1u];
            idx[pos] = idx[pos - 1u];
            pos = pos - 1u;
        }
        val[pos] = x;
        idx[pos] = j;
    }
    for (var i = 0u; i < have; i = i + 1u) {
        out[o + i] = idx[i];
    }
}
