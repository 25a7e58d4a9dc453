//! Host checks: shapes taken, tile choice, constants and signature against conv.cu.

use super::*;
use aperture_engine::backend::Activation;

fn conv3(c_in: usize, c_out: usize, stride: usize) -> DenseConv {
    DenseConv {
        c_in,
        c_out,
        kh: 3,
        kw: 3,
        stride,
        pad: 1,
        kp: 9 * c_in,
        depthwise: false,
    }
}

#[test]
fn takes_dense_convolutions_with_channels_in_eights() {
    let g = Geometry::new([2, 17, 23, 64], (17, 23), conv3(64, 64, 1), Tile::N64);
    let g = g.expect("3x3 64->64 fits");
    assert_eq!(g.m, 2 * 17 * 23);
    assert_eq!(g.k, 576);
    assert_eq!(g.n_tiles, 1);
    assert_eq!(g.blocks, (2 * 17 * 23usize).div_ceil(128));
    let s2 = Geometry::new([1, 80, 80, 128], (40, 40), conv3(128, 256, 2), Tile::N64);
    assert_eq!(s2.map(|g| (g.n_tiles, g.blocks)), Some((4, 13 * 4)));
    let five = DenseConv {
        kh: 5,
        kw: 5,
        pad: 2,
        kp: 25 * 8,
        ..conv3(8, 16, 1)
    };
    assert!(Geometry::new([1, 9, 9, 8], (9, 9), five, Tile::N64).is_some());
    // A 1x1 with stride 2 is no plain product: the kernel takes it.
    let strided_1x1 = DenseConv {
        kh: 1,
        kw: 1,
        pad: 0,
        kp: 16,
        ..conv3(16, 16, 2)
    };
    assert!(Geometry::new([1, 8, 8, 16], (4, 4), strided_1x1, Tile::N64).is_some());
    // Any output count, e.g. a 3-channel image output: one channel tile.
    let out3 = Geometry::new([1, 8, 8, 96], (8, 8), conv3(96, 3, 1), Tile::N64);
    assert_eq!(out3.map(|g| g.n_tiles), Some(1));
    assert!(Geometry::new([1, 8, 8, 96], (8, 8), conv3(96, 0, 1), Tile::N64).is_none());
}

#[test]
fn pointwise_products_only_on_wgmma_tiles() {
    let pointwise = DenseConv {
        kh: 1,
        kw: 1,
        pad: 0,
        kp: 64,
        ..conv3(64, 128, 1)
    };
    let g = Geometry::pointwise([8, 40, 44, 64], (40, 44), pointwise, Tile::Wg128);
    assert_eq!(g.map(|g| (g.m, g.k, g.n_tiles)), Some((8 * 40 * 44, 64, 1)));
    assert!(Geometry::pointwise([8, 40, 44, 64], (40, 44), pointwise, Tile::N128).is_none());
    assert!(Geometry::new([8, 40, 44, 64], (40, 44), pointwise, Tile::Wg128).is_none());
    // A 3x3 is not a pointwise product.
    let three = conv3(64, 128, 1);
    assert!(Geometry::pointwise([8, 40, 44, 64], (40, 44), three, Tile::Wg128).is_none());
}

#[test]
fn leaves_other_convolutions_to_the_previous_paths() {
    // The 3-channel image input, other odd inputs, pointwise, depthwise, padded K.
    let image = DenseConv {
        kp: 32,
        ..conv3(3, 48, 1)
    };
    assert!(Geometry::new([1, 8, 8, 3], (8, 8), image, Tile::N64).is_none());
    assert!(Geometry::new([1, 8, 8, 12], (8, 8), conv3(12, 16, 1), Tile::N64).is_none());
    let pointwise = DenseConv {
        kh: 1,
        kw: 1,
        pad: 0,
        kp: 64,
        ..conv3(64, 64, 1)
    };
    assert!(Geometry::new([1, 8, 8, 64], (8, 8), pointwise, Tile::N64).is_none());
    let dw = DenseConv {
        depthwise: true,
        ..conv3(64, 64, 1)
    };
    assert!(Geometry::new([1, 8, 8, 64], (8, 8), dw, Tile::N64).is_none());
    let padded = DenseConv {
        kp: 9 * 64 + 8,
        ..conv3(64, 64, 1)
    };
    assert!(Geometry::new([1, 8, 8, 64], (8, 8), padded, Tile::N64).is_none());
    // Input channels that disagree with the weights, and 32-bit overflow.
    assert!(Geometry::new([1, 8, 8, 32], (8, 8), conv3(64, 64, 1), Tile::N64).is_none());
    assert!(Geometry::new(
        [40_000, 256, 256, 64],
        (256, 256),
        conv3(64, 64, 1),
        Tile::N64
    )
    .is_none());
}

/// The value of `#define NAME v` in conv.cu.
fn define(name: &str) -> usize {
    crate::kernels::source_define(CONV_SOURCE, "conv.cu", name)
}

#[test]
fn host_constants_match_the_kernel() {
    assert_eq!(define("IG_BM"), TILE_M);
    assert_eq!(define("IG_BM_SMALL"), Tile::M64.pixels());
    assert_eq!(define("IG_BN_SMALL"), Tile::N64.channels());
    assert_eq!(define("IG_BN_WIDE"), Tile::N128.channels());
    assert_eq!(define("IG_LD"), 40);
    assert_eq!(define("IG_STAGES"), 3);
    for tile in Tile::ALL {
        let smem = define("IG_STAGES") * (tile.pixels() + tile.channels()) * define("IG_LD") * 2;
        assert_eq!(smem, tile.smem_bytes() as usize);
        // Two warps along the pixels, 32 channels per warp.
        assert_eq!(tile.threads() as usize, 2 * 32 * tile.warps_n());
        // Under the 227 KB a block may ask for on sm_90 (and the 99 KB of sm_86).
        assert!(smem <= 99 * 1024);
    }
    assert!(Tile::N64.smem_bytes() <= 48 * 1024);
    assert!(Tile::M64.smem_bytes() <= 48 * 1024);
    let wg = |name: &str| crate::kernels::source_define(WGMMA_SOURCE, "conv_wgmma.cu", name);
    assert_eq!(wg("WG_BM"), TILE_M);
    assert_eq!(wg("WG_BK"), 64);
    assert_eq!(wg("WG_STAGES_N192"), WG_STAGES_N192);
    assert_eq!(wg("WG_STAGES_N128"), WG_STAGES_N128);
    assert_eq!(wg("WG_STAGES_N64"), WG_STAGES_N64);
    for tile in Tile::WGMMA {
        assert_eq!(tile.pixels(), wg("WG_BM"));
        assert!(tile.smem_bytes() as usize <= 227 * 1024);
    }
    // One block of 128 x 192 or 128 x 128 per multiprocessor, two of 128 x 64 (228 KB on
    // sm_90).
    assert!(Tile::Wg128.smem_bytes() as usize > 114 * 1024);
    assert!(Tile::Wg192.smem_bytes() as usize > 114 * 1024);
    assert!(2 * Tile::Wg64.smem_bytes() as usize <= 228 * 1024 - 2 * 1024);
    // Rows of 16-byte aligned segments for cp.async and ldmatrix.
    assert_eq!(define("IG_LD") * 2 % 16, 0);
    assert_eq!(define("IG_BK") % 16, 0);
}

const MMA_SYNC: Tiles = Tiles {
    wide: true,
    wgmma: false,
    wgmma_always: false,
    warp_specialised: false,
};

#[test]
fn wide_tile_only_where_it_fills_the_gpu() {
    // D-FINE's 256-channel 3x3 at 80x80: batch 32 fills 132 SMs with wide tiles,
    // batch 1 (100 wide blocks, 200 of 128 x 64) takes the small tile (400 blocks);
    // batch 2 the 128 x 64 one (400 blocks).
    let narrow = Tiles {
        wide: false,
        ..MMA_SYNC
    };
    assert_eq!(Tile::choose(256, 32 * 6400, 132, MMA_SYNC), Tile::N128);
    assert_eq!(Tile::choose(256, 6400, 132, MMA_SYNC), Tile::M64);
    assert_eq!(Tile::choose(256, 2 * 6400, 132, narrow), Tile::N64);
    assert_eq!(Tile::choose(256, 32 * 6400, 132, narrow), Tile::N64);
    assert_eq!(Tile::choose(64, 32 * 6400, 132, MMA_SYNC), Tile::N64);
    assert_eq!(Tile::choose(72, 132 * 128, 132, MMA_SYNC), Tile::N128);
    let g = Geometry::new([2, 80, 80, 256], (80, 80), conv3(256, 256, 1), Tile::N128);
    assert_eq!(g.map(|g| (g.n_tiles, g.blocks)), Some((2, 100 * 2)));
    let g = Geometry::new([1, 80, 80, 256], (80, 80), conv3(256, 256, 1), Tile::M64);
    assert_eq!(g.map(|g| (g.n_tiles, g.blocks)), Some((4, 100 * 4)));
}

#[test]
fn wgmma_tiles_where_loaded_and_their_grid_fills_the_gpu() {
    let hopper = Tiles {
        wgmma: true,
        ..MMA_SYNC
    };
    // Batch 32 at 80x80, 256 channels: 3,200 blocks of 128 x 128.
    assert_eq!(Tile::choose(256, 32 * 6400, 132, hopper), Tile::Wg128);
    // Batch 2: 200 blocks of 128 x 128; 64 channels: the 64-wide wgmma tile.
    assert_eq!(Tile::choose(256, 2 * 6400, 132, hopper), Tile::Wg128);
    assert_eq!(Tile::choose(64, 32 * 6400, 132, hopper), Tile::Wg64);
    // 192 channels: one 192-wide tile instead of 128 + a half-empty second one.
    assert_eq!(Tile::choose(192, 32 * 6400, 132, hopper), Tile::Wg192);
    // Batch 1 at 40x40 (13 pixel tiles): 104 blocks of 128 x 64 for 512 channels, too
    // few for either: the mma.sync tiles' rule.
    assert_eq!(Tile::choose(512, 1600, 132, hopper), Tile::M64);
    // 100 blocks of 128 x 128 but 200 of 128 x 64: the narrower wgmma tile.
    assert_eq!(Tile::choose(256, 6400, 132, hopper), Tile::Wg64);
    let forced = Tiles {
        wgmma_always: true,
        ..hopper
    };
    assert_eq!(Tile::choose(512, 1600, 132, forced), Tile::Wg128);
    assert_eq!(Tile::choose(8, 64, 132, forced), Tile::Wg64);
}

#[test]
fn launch_arguments_match_the_kernel_signature() {
    for (tile, bounds) in [
        (Tile::N64, "128, 4"),
        (Tile::N128, "256, 2"),
        (Tile::M64, "128, 4"),
    ] {
        let decl = format!(
            "extern \"C\" __global__ void __launch_bounds__({bounds})\n{}(",
            tile.entry()
        );
        let start = CONV_SOURCE.find(&decl).expect("entry point is declared") + decl.len();
        let end = start + CONV_SOURCE[start..].find(')').expect("parameter list ends");
        check_parameters(&CONV_SOURCE[start..end]);
        let (threads, blocks) = bounds.split_once(", ").expect("two bounds");
        assert_eq!(threads, tile.threads().to_string());
        assert_eq!(blocks, tile.blocks_per_multiprocessor().to_string());
    }
}

/// The parameter list of conv_wgmma.cu's WG_ENTRY macro, which declares every `wgmma`
/// entry point.
fn wgmma_entry_parameters() -> String {
    let start = WGMMA_SOURCE.find("#define WG_ENTRY(").expect("entry macro");
    let body = &WGMMA_SOURCE[start..];
    assert!(body.contains("__launch_bounds__(THREADS, BLOCKS)"));
    let params_start = body.find("NAME(").expect("parameter list") + "NAME(".len();
    let params_end = params_start + body[params_start..].find(')').expect("list ends");
    body[params_start..params_end].replace('\\', " ")
}

#[test]
fn wgmma_entry_points_match_their_launch() {
    check_parameters(&wgmma_entry_parameters());
    let stages = |tile: Tile| match tile {
        Tile::Wg192 => "WG_STAGES_N192",
        Tile::Wg128 => "WG_STAGES_N128",
        _ => "WG_STAGES_N64",
    };
    for tile in Tile::WGMMA {
        let (name, bn, s) = (tile.entry(), tile.channels(), stages(tile));
        let (threads, blocks) = (tile.threads(), tile.blocks_per_multiprocessor());
        let decl = format!("WG_ENTRY({name}, wg_conv, {threads}, {blocks}, {bn}, {s})");
        assert!(WGMMA_SOURCE.contains(&decl), "{decl}");
        // The warp-specialised kernel of the tile: 384 threads, one block per SM.
        let ws = tile.ws_entry().expect("a wgmma tile");
        let decl = format!("WG_ENTRY({ws}, wg_conv_ws, {WS_THREADS}, 1, {bn}, {s})");
        assert!(WGMMA_SOURCE.contains(&decl), "{decl}");
        assert_eq!(tile.launch_shape(true), (WS_THREADS, tile.ws_smem_bytes()));
        assert_eq!(
            tile.launch_shape(false),
            (tile.threads(), tile.smem_bytes())
        );
        assert!(tile.ws_smem_bytes() as usize <= 227 * 1024);
    }
    // The mbarriers (full and empty per stage, 8 bytes each) fit their area.
    let wg = |name: &str| crate::kernels::source_define(WGMMA_SOURCE, "conv_wgmma.cu", name);
    let most = wg("WG_STAGES_N192")
        .max(wg("WG_STAGES_N128"))
        .max(wg("WG_STAGES_N64"));
    assert!(2 * most * 8 <= WS_BARRIER_BYTES as usize);
    assert_eq!(Tile::N64.ws_entry(), None);
    assert_eq!(Tile::N64.launch_shape(true), (128, Tile::N64.smem_bytes()));
}

fn check_parameters(list: &str) {
    let params: Vec<&str> = list.split(',').map(str::trim).collect();
    let pointers = params.iter().filter(|p| p.contains('*')).count();
    assert_eq!(pointers, 5);
    let g = Geometry::new([1, 8, 8, 8], (8, 8), conv3(8, 8, 1), Tile::N64).expect("fits");
    assert_eq!(params.len(), 5 + g.int_args(Activation::Gelu, 8, 8).len());
    // The integer arguments in the order int_args gives them.
    let names: Vec<&str> = params[5..]
        .iter()
        .map(|p| p.trim_start_matches("int ").trim())
        .collect();
    assert_eq!(
        names,
        [
            "H", "W", "C", "OH", "OW", "Cout", "KW", "stride", "pad", "M", "K", "Kp", "n_tiles",
            "act", "ldx", "ldy"
        ]
    );
}

#[test]
fn sources_per_storage_type() {
    let plain = ConvExtras::default();
    assert!(conv_source(Storage::F32, plain).is_none());
    let f16 = conv_source(Storage::F16, plain).expect("fp16 source");
    let bf16 = conv_source(Storage::BF16, plain).expect("bf16 source");
    let ws = conv_source(
        Storage::F16,
        ConvExtras {
            warp_specialised: true,
            ..plain
        },
    )
    .expect("fp16 source with ws");
    // The tensor-core depthwise kernels likewise.
    let dwm = conv_source(
        Storage::F16,
        ConvExtras {
            depthwise_mma: true,
            ..plain
        },
    )
    .expect("fp16 source with the depthwise kernels");
    assert!(!f16.contains("DWM_KERNEL(dwm5_w8") && dwm.contains("DWM_KERNEL(dwm5_w8"));
    // The staged small-taps entry points likewise (behind SMALL_TAPS_STAGED).
    let staged = conv_source(
        Storage::F16,
        ConvExtras {
            staged_small_taps: true,
            ..plain
        },
    )
    .expect("fp16 source with the staged small-taps kernels");
    assert!(
        !f16.contains("#define SMALL_TAPS_STAGED")
            && staged.contains("#define SMALL_TAPS_STAGED 1")
    );
    let entry = staged
        .find("SMALL_MMA_KERNEL(small_taps_mma_staged32,")
        .expect("entry");
    assert!(staged.find("#ifdef SMALL_TAPS_STAGED").expect("gate") < entry);
    assert!(f16.contains("SMALL_MMA_KERNEL(small_taps_mma32"));
    assert!(f16.contains("typedef __half T;") && !f16.contains("#define IGEMM_BF16"));
    assert!(bf16.contains("typedef __nv_bfloat16 T;") && bf16.contains("#define IGEMM_BF16 1"));
    // The warp-specialised entries are built only on request (their compile time).
    assert!(!f16.contains("#define WG_WARP_SPECIALISED"));
    assert!(ws.contains("#define WG_WARP_SPECIALISED 1"));
    for name in [
        "conv_wgmma_ws_n192",
        "conv_wgmma_ws_n128",
        "conv_wgmma_ws_n64",
    ] {
        let entry = ws.find(&format!("WG_ENTRY({name},")).expect("entry");
        let gate = ws.find("#ifdef WG_WARP_SPECIALISED").expect("gate");
        assert!(
            gate < entry,
            "{name} is outside the WG_WARP_SPECIALISED block"
        );
    }
    for src in [f16, bf16, ws] {
        assert!(!src.contains('\0'));
        assert_eq!(src.matches('{').count(), src.matches('}').count());
        assert_eq!(src.matches('(').count(), src.matches(')').count());
    }
}
