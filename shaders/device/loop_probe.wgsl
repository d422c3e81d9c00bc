// Counts how many loop iterations one invocation really runs when asked for p.n.
//
// Mesa's llvmpipe and lavapipe end every loop of an invocation once 65,535 iterations have run
// in all its loops together (a guard against hangs), silently: the results are simply wrong.
// The host runs this once per device and plans every kernel's per-invocation work below the
// limit it finds (`Caps::loop_limit`).

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(1, 1, 1)
fn main() {
    var count = 0u;
    for (var i = 0u; i < p.n; i = i + 1u) {
        count = count + 1u + out[i & 1u] * 0u;
    }
    out[2] = count;
}
