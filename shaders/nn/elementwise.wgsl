// Elementwise kernels over f32 activations, selected by OP:
//   0  y += x                      (residual add)
//   1  y  = silu(y) ⊙ x            (SwiGLU: y holds the gate, x the up projection)
//   2  y[r, c] += bias[c]          (x is the bias vector, bound as an operand of any dtype)
// All act on `n` elements starting at y_off / x_off; for OP 2, `cols` is the row length.

struct Params {
    n: u32,
    cols: u32,
    y_off: u32,
    x_off: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
{{OPERANDS}}
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const OP: u32 = {{OP}}u;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let yi = p.y_off + i;
    if (OP == 0u) {
        y[yi] = y[yi] + load_x1(p.x_off + i);
    } else if (OP == 1u) {
        let g = y[yi];
        y[yi] = g / (1.0 + exp(-g)) * load_x1(p.x_off + i);
    } else {
        y[yi] = y[yi] + load_x1(i % p.cols);
    }
}
