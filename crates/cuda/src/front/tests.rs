//! Host-side checks of the front-half launches against `kernels/front.cu`.

use super::fused::{HALO_ROWS, TILE_COLS, TILE_ROWS};
use super::product::PRODUCT_TILE;
use super::*;
use crate::conv_igemm::{DenseConv, FRONT_SOURCE};

fn define(name: &str) -> usize {
    crate::kernels::source_define(FRONT_SOURCE, "front.cu", name)
}

#[test]
fn host_constants_match_the_kernel() {
    assert_eq!(define("FR_TH"), TILE_ROWS);
    assert_eq!(define("FR_TW"), TILE_COLS);
    assert_eq!(define("FR_MROWS"), HALO_ROWS);
    assert_eq!(define("FR_NS"), SLICE);
    assert_eq!(define("FR_PLD"), PRODUCT_LD);
    assert_eq!(define("FR_CMAX"), MAX_CHANNELS);
    // The halo padded to whole 16-row product tiles; eight warps, two columns each.
    let halo = (TILE_ROWS + 2) * (TILE_COLS + 2);
    assert!(HALO_ROWS >= halo && HALO_ROWS.is_multiple_of(16) && HALO_ROWS - halo < 16);
    assert_eq!(THREADS as usize, 32 * TILE_COLS / 2);
    // The normalising pass covers the padded rows in whole rounds of 32 pixels.
    assert!(HALO_ROWS.is_multiple_of(THREADS as usize / 8));
    // Within the 227 KB a block may ask for on sm_90.
    assert!(smem_bytes(MAX_CHANNELS) <= 227 * 1024);
    let decl = "__launch_bounds__(256, 2)\nnorm_pointwise_depthwise(";
    assert!(FRONT_SOURCE.contains(decl));
}

fn pointwise(c_in: usize, c_out: usize) -> DenseConv {
    DenseConv {
        c_in,
        c_out,
        kh: 1,
        kw: 1,
        stride: 1,
        pad: 0,
        kp: c_in,
        depthwise: false,
    }
}

fn depthwise(c: usize) -> DenseConv {
    DenseConv {
        c_in: c,
        c_out: c,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
        kp: 9,
        depthwise: true,
    }
}

#[test]
fn takes_restormer_base_front_halves() {
    // Level 1 (48 channels): qkv 48 -> 144, project_in 48 -> 2 x 128 (hidden padded).
    let qkv = FrontLaunch::new([1, 512, 512, 48], pointwise(48, 144), depthwise(144), false)
        .expect("attention front");
    assert_eq!((qkv.tiles_y, qkv.tiles_x, qkv.blocks()), (64, 32, 2048));
    assert_eq!(qkv.out_channels(), 144);
    let ffn = FrontLaunch::new([2, 520, 776, 96], pointwise(96, 512), depthwise(512), true)
        .expect("feed-forward front");
    assert_eq!((ffn.tiles_y, ffn.tiles_x), (65, 49));
    assert_eq!(ffn.out_channels(), 256);
    for c in [48usize, 96, 192] {
        let h = 2 * ((c * 266 / 100).div_ceil(8) * 8);
        assert!(FrontLaunch::new([1, 64, 64, c], pointwise(c, h), depthwise(h), true).is_some());
    }
}

#[test]
fn leaves_other_shapes_to_the_separate_operations() {
    let dims = |c| [1, 32, 32, c];
    // 384 channels (level 4) exceed what the normalising lanes hold; 40 is not a
    // multiple of 16.
    assert!(FrontLaunch::new(dims(384), pointwise(384, 1152), depthwise(1152), false).is_none());
    assert!(FrontLaunch::new(dims(40), pointwise(40, 120), depthwise(120), false).is_none());
    // Odd products, an odd gated half, mismatched depthwise widths.
    assert!(FrontLaunch::new(dims(48), pointwise(48, 145), depthwise(145), false).is_none());
    assert!(FrontLaunch::new(dims(48), pointwise(48, 130), depthwise(130), true).is_none());
    assert!(FrontLaunch::new(dims(48), pointwise(48, 144), depthwise(128), false).is_none());
    // Input channels other than the pointwise weight's, a 3x3 "pointwise", a strided
    // depthwise.
    assert!(FrontLaunch::new(dims(64), pointwise(48, 144), depthwise(144), false).is_none());
    let mut dense3 = pointwise(48, 144);
    (dense3.kh, dense3.kw, dense3.pad, dense3.kp) = (3, 3, 1, 432);
    assert!(FrontLaunch::new(dims(48), dense3, depthwise(144), false).is_none());
    let mut strided = depthwise(144);
    strided.stride = 2;
    assert!(FrontLaunch::new(dims(48), pointwise(48, 144), strided, false).is_none());
}

#[test]
fn product_kernel_takes_restormer_base_widths() {
    let l = ProductLaunch::new([2, 512, 512, 48], pointwise(48, 144)).expect("qkv");
    assert_eq!((l.m, l.blocks()), (2 * 512 * 512, 2 * 512 * 512 / 128));
    assert!(ProductLaunch::new([1, 64, 64, 192], pointwise(192, 1024)).is_some());
    assert!(ProductLaunch::new([1, 7, 9, 96], pointwise(96, 512)).is_some());
    // Level 4's 384 channels, products not in whole 16-byte vectors, a 3x3.
    assert!(ProductLaunch::new([1, 32, 32, 384], pointwise(384, 1152)).is_none());
    assert!(ProductLaunch::new([1, 32, 32, 48], pointwise(48, 150)).is_none());
    let mut dense3 = pointwise(48, 144);
    (dense3.kh, dense3.kw, dense3.pad, dense3.kp) = (3, 3, 1, 432);
    assert!(ProductLaunch::new([1, 32, 32, 48], dense3).is_none());
    assert_eq!(define("NP_BM"), PRODUCT_TILE);
    for c in PRODUCT_SPECIALISED {
        assert!(FRONT_SOURCE.contains(&format!("NP_ENTRY(norm_pointwise_c{c}, {c},")));
        assert!(c.is_multiple_of(16) && c <= MAX_CHANNELS);
    }
    assert!(FRONT_SOURCE.contains("NP_ENTRY(norm_pointwise, 0,"));
    assert!(product_smem_bytes(MAX_CHANNELS) <= 227 * 1024);
    let start = FRONT_SOURCE
        .find("#define NP_PARAMS")
        .expect("parameter list")
        + "#define NP_PARAMS".len();
    let end = start + FRONT_SOURCE[start..].find("#define").expect("list ends");
    let list = FRONT_SOURCE[start..end].replace('\\', " ");
    assert_eq!(
        parameter_names(&list),
        ["x", "ln_w", "ln_b", "w1", "b1", "y", "M", "C", "ldw", "P", "eps"]
    );
}

fn parameter_names(list: &str) -> Vec<String> {
    list.split(',')
        .map(|p| {
            p.split_whitespace()
                .last()
                .unwrap_or("")
                .trim_start_matches('*')
                .to_string()
        })
        .collect()
}

#[test]
fn launch_arguments_match_the_kernel_signature() {
    let start = FRONT_SOURCE
        .find("norm_pointwise_depthwise(const")
        .expect("entry point")
        + "norm_pointwise_depthwise(".len();
    let end = start
        + FRONT_SOURCE[start..]
            .find(')')
            .expect("parameter list ends");
    assert_eq!(
        parameter_names(&FRONT_SOURCE[start..end]),
        [
            "x", "ln_w", "ln_b", "w1", "b1", "wd", "bd", "y", "H", "W", "C", "ldw", "P", "gate",
            "tiles_y", "tiles_x", "eps"
        ]
    );
}
