//! WGSL snippets that bind a read-only operand and decode its storage type to f32.
//!
//! For an operand named `x` at binding `b` this emits `x_data` plus `load_x1(i) -> f32` and
//! `load_x4(i) -> vec4<f32>` (elements i..i+3), and `load_x4_clamped(row_base, j0, n)` (four
//! elements of a row, indices past n clamped; shared by gemm and hessian). In the aligned variant the buffer is viewed as
//! vec4<f32> (f32) or vec2<u32> (two packed 16-bit pairs) and `load_x4` is one vector load, which
//! requires `i % 4 == 0`; the unaligned variant gathers scalars and accepts any `i`.

use crate::dtype::DType;

/// Whether an operand can take the vector path: every load offset the kernel forms is a
/// multiple of 4 when the base offset and the row stride are.
pub(crate) fn aligned(offset: usize, stride: usize) -> bool {
    offset.is_multiple_of(4) && stride.is_multiple_of(4)
}

/// The bindings and loaders of operand `name` (see the module doc).
pub(crate) fn operand_wgsl(name: &str, binding: u32, dtype: DType, aligned: bool) -> String {
    let mut src = loaders(name, binding, dtype, aligned);
    // Four consecutive elements j0..j0+3 of a row starting at `row_base`, indices past `n`
    // clamped to n-1 (callers never store what clamped lanes compute).
    src.push_str(&format!(
        "fn load_{name}4_clamped(row_base: u32, j0: u32, n: u32) -> vec4<f32> {{\n\
         \x20   if (j0 + 3u < n) {{ return load_{name}4(row_base + j0); }}\n\
         \x20   let last = n - 1u;\n\
         \x20   return vec4<f32>(load_{name}1(row_base + min(j0, last)), load_{name}1(row_base + min(j0 + 1u, last)), load_{name}1(row_base + min(j0 + 2u, last)), load_{name}1(row_base + min(j0 + 3u, last)));\n\
         }}\n"
    ));
    src
}

/// `load_NAME1` and `load_NAME4` for one operand binding.
fn loaders(name: &str, binding: u32, dtype: DType, aligned: bool) -> String {
    let d = format!("{name}_data");
    let decl =
        |ty: &str| format!("@group(0) @binding({binding}) var<storage, read> {d}: array<{ty}>;\n");
    // Decoders for one packed 32-bit word holding two 16-bit values (low half = lower index).
    let (lo, hi, pair) = match dtype {
        DType::BF16 => (
            "bitcast<f32>(W << 16u)",
            "bitcast<f32>(W & 0xffff0000u)",
            "vec2<f32>(bitcast<f32>(W << 16u), bitcast<f32>(W & 0xffff0000u))",
        ),
        _ => (
            "unpack2x16float(W).x",
            "unpack2x16float(W).y",
            "unpack2x16float(W)",
        ),
    };
    let w = |expr: &str, word: &str| expr.replace('W', word);
    match (dtype, aligned) {
        (DType::F32, true) => format!(
            "{}fn load_{name}4(i: u32) -> vec4<f32> {{ return {d}[i >> 2u]; }}\n\
             fn load_{name}1(i: u32) -> f32 {{ return {d}[i >> 2u][i & 3u]; }}\n",
            decl("vec4<f32>")
        ),
        (DType::F32, false) => format!(
            "{}fn load_{name}4(i: u32) -> vec4<f32> {{ return vec4<f32>({d}[i], {d}[i + 1u], {d}[i + 2u], {d}[i + 3u]); }}\n\
             fn load_{name}1(i: u32) -> f32 {{ return {d}[i]; }}\n",
            decl("f32")
        ),
        (_, true) => format!(
            "{}fn load_{name}4(i: u32) -> vec4<f32> {{ let v = {d}[i >> 2u]; return vec4<f32>({}, {}); }}\n\
             fn load_{name}1(i: u32) -> f32 {{ let v = {d}[i >> 2u][(i >> 1u) & 1u]; return select({}, {}, (i & 1u) == 1u); }}\n",
            decl("vec2<u32>"),
            w(pair, "v.x"),
            w(pair, "v.y"),
            w(lo, "v"),
            w(hi, "v"),
        ),
        (_, false) => format!(
            "{}fn load_{name}1(i: u32) -> f32 {{ let v = {d}[i >> 1u]; return select({}, {}, (i & 1u) == 1u); }}\n\
             fn load_{name}4(i: u32) -> vec4<f32> {{ return vec4<f32>(load_{name}1(i), load_{name}1(i + 1u), load_{name}1(i + 2u), load_{name}1(i + 3u)); }}\n",
            decl("u32"),
            w(lo, "v"),
            w(hi, "v"),
        ),
    }
}
