// out = inᵀ for one (input chunk, output chunk) pair: input rows [in_row0, in_row0 + in_rows)
// of an m × n matrix and output rows (= input columns) [out_row0, out_row0 + out_rows).
// Input may be f32/f16/bf16 (OPERANDS: binding 1, load_x1); output f32 [n, m].

struct Params {
    m: u32,          // input rows (output row length)
    n: u32,          // input columns
    in_row0: u32,
    in_rows: u32,
    out_row0: u32,
    out_rows: u32,
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
{{OPERANDS}}
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x; // output row within the output chunk (input column out_row0 + j)
    let i = gid.y; // input row within the input chunk
    if (j >= p.out_rows || i >= p.in_rows) {
        return;
    }
    out[j * p.m + p.in_row0 + i] = load_x1(i * p.n + p.out_row0 + j);
}
