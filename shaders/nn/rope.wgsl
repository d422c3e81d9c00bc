// Rotary position embedding in place, rotate_half layout (as in Hugging Face checkpoints): for
// each head, element i < d/2 pairs with i + d/2:
//   x[i]       ← x[i] cos θ − x[i + d/2] sin θ
//   x[i + d/2] ← x[i + d/2] cos θ + x[i] sin θ
// θ = position · inv_freq[i]; cos/sin come from a host-computed table [positions, d/2] (f64 on
// the host, so default, linear and llama3 scaling all reduce to the table).
//
// Specialized by the host: SIGN, 1.0 for the rotation, −1.0 for its inverse (= its transpose:
// the gradient of the rotation, rotating dy back).

struct Params {
    rows: u32,      // rows of x in this dispatch
    heads: u32,     // heads per row
    half: u32,      // d / 2
    row_off: u32,   // first row (into positions)
    x_off: u32,     // element offset of x[0, 0] in its chunk
    max_pos: u32,   // rows of the table
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

const SIGN: f32 = {{SIGN}};

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x % p.half;
    let head = gid.x / p.half;
    let r = gid.y + gid.z * 65535u;
    if (head >= p.heads || r >= p.rows) {
        return;
    }
    let pos = min(positions[p.row_off + r], p.max_pos - 1u);
    let c = cos_t[pos * p.half + i];
    let s = SIGN * sin_t[pos * p.half + i];
    let base = p.x_off + r * p.heads * 2u * p.half + head * 2u * p.half;
    let x1 = x[base + i];
    let x2 = x[base + i + p.half];
    x[base + i] = x1 * c - x2 * s;
    x[base + i + p.half] = x2 * c + x1 * s;
}
