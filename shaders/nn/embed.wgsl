// Embedding gather: out[r, :] = table[ids[r], :] for the rows whose id falls in the bound chunk
// of the table ([row0, row0 + rows) of the vocabulary). The table may be f32, f16 or bf16.
//
// Specialized by the host (src/gpu/ops.rs): OPERANDS (binding 2, the table, load_e1/load_e4).

struct Params {
    n: u32,      // rows of out in this dispatch
    h: u32,      // hidden size
    row0: u32,   // first vocabulary row held by the table chunk
    rows: u32,   // vocabulary rows held by the table chunk
    ids_off: u32, // index of the first id of this dispatch
    out_off: u32, // element offset of out[0, 0]
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
{{OPERANDS}}
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let r = gid.y + gid.z * 65535u;
    if (c >= p.h || r >= p.n) {
        return;
    }
    let id = ids[p.ids_off + r];
    if (id < p.row0 || id - p.row0 >= p.rows) {
        return;
    }
    out[p.out_off + r * p.h + c] = load_e1((id - p.row0) * p.h + c);
}
