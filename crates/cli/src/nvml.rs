//! GPU metrics for `aperture serve` through NVML (`libnvidia-ml.so.1`, loaded at run
//! time, so machines without a driver simply have none): Triton's `nv_gpu_utilization`,
//! `nv_gpu_memory_total_bytes`, `nv_gpu_memory_used_bytes` and `nv_gpu_power_usage`,
//! labelled by `gpu_uuid`.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fmt::Write;

use aperture_server::GpuMetrics;
use libloading::{Library, Symbol};

type Device = *mut c_void;

#[repr(C)]
#[derive(Default)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[repr(C)]
#[derive(Default)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

/// `nvmlMemory_v2_t`: "used" excludes the driver's reserved memory, as `nvidia-smi`
/// reports it (version 1's "used" is total - free, reserved included).
#[repr(C)]
struct MemoryV2 {
    version: c_uint,
    total: u64,
    reserved: u64,
    free: u64,
    used: u64,
}

impl Default for MemoryV2 {
    fn default() -> Self {
        Self {
            // NVML_STRUCT_VERSION(Memory, 2): the struct's size | version << 24.
            version: std::mem::size_of::<MemoryV2>() as c_uint | (2 << 24),
            total: 0,
            reserved: 0,
            free: 0,
            used: 0,
        }
    }
}

/// One reading of one GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSample {
    pub uuid: String,
    /// Fraction of the last sample period the GPU was busy, 0..1.
    pub utilization: f64,
    pub memory_total: u64,
    pub memory_used: u64,
    pub power_watts: f64,
}

/// Appends the metric families for `samples` in the Prometheus text format.
pub fn render_samples(samples: &[GpuSample], out: &mut String) {
    type Field = fn(&GpuSample) -> f64;
    let families: [(&str, &str, Field); 4] = [
        (
            "nv_gpu_utilization",
            "GPU utilization rate [0.0 - 1.0)",
            |s| s.utilization,
        ),
        (
            "nv_gpu_memory_total_bytes",
            "GPU total memory, in bytes",
            |s| s.memory_total as f64,
        ),
        (
            "nv_gpu_memory_used_bytes",
            "GPU used memory, in bytes",
            |s| s.memory_used as f64,
        ),
        ("nv_gpu_power_usage", "GPU power usage in watts", |s| {
            s.power_watts
        }),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in samples {
            let _ = writeln!(out, "{name}{{gpu_uuid=\"{}\"}} {}", s.uuid, value(s));
        }
    }
}

/// NVML opened once; devices are read on every scrape.
pub struct Nvml {
    lib: Library,
    devices: Vec<(String, usize)>,
}

const SUCCESS: c_int = 0;

impl Nvml {
    /// `None` when NVML is missing or has no GPU (no driver: no GPU metrics).
    pub fn open() -> Option<Self> {
        // SAFETY: loading the driver's NVML library runs no initialisers of ours; the
        // symbols below are called with the signatures of NVML's public C API.
        unsafe {
            let lib = Library::new("libnvidia-ml.so.1").ok()?;
            let init: Symbol<unsafe extern "C" fn() -> c_int> = lib.get(b"nvmlInit_v2\0").ok()?;
            if init() != SUCCESS {
                return None;
            }
            let count_fn: Symbol<unsafe extern "C" fn(*mut c_uint) -> c_int> =
                lib.get(b"nvmlDeviceGetCount_v2\0").ok()?;
            let handle_fn: Symbol<unsafe extern "C" fn(c_uint, *mut Device) -> c_int> =
                lib.get(b"nvmlDeviceGetHandleByIndex_v2\0").ok()?;
            let uuid_fn: Symbol<unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int> =
                lib.get(b"nvmlDeviceGetUUID\0").ok()?;
            let mut count: c_uint = 0;
            if count_fn(&mut count) != SUCCESS || count == 0 {
                return None;
            }
            let mut devices = Vec::new();
            for i in 0..count {
                let mut dev: Device = std::ptr::null_mut();
                if handle_fn(i, &mut dev) != SUCCESS {
                    continue;
                }
                let mut buf = [0 as c_char; 96];
                let uuid = if uuid_fn(dev, buf.as_mut_ptr(), buf.len() as c_uint) == SUCCESS {
                    CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
                } else {
                    format!("gpu-{i}")
                };
                devices.push((uuid, dev as usize));
            }
            Some(Self { lib, devices })
        }
    }

    /// Reads every device; a failed reading leaves that value at zero.
    pub fn sample(&self) -> Vec<GpuSample> {
        // SAFETY: device handles came from NVML above and stay valid while the library
        // is loaded (it is owned by `self`); the out-parameters match NVML's structs.
        unsafe {
            let util_fn: Option<Symbol<unsafe extern "C" fn(Device, *mut Utilization) -> c_int>> =
                self.lib.get(b"nvmlDeviceGetUtilizationRates\0").ok();
            let mem_fn: Option<Symbol<unsafe extern "C" fn(Device, *mut Memory) -> c_int>> =
                self.lib.get(b"nvmlDeviceGetMemoryInfo\0").ok();
            let mem2_fn: Option<Symbol<unsafe extern "C" fn(Device, *mut MemoryV2) -> c_int>> =
                self.lib.get(b"nvmlDeviceGetMemoryInfo_v2\0").ok();
            let power_fn: Option<Symbol<unsafe extern "C" fn(Device, *mut c_uint) -> c_int>> =
                self.lib.get(b"nvmlDeviceGetPowerUsage\0").ok();
            self.devices
                .iter()
                .map(|(uuid, handle)| {
                    let dev = *handle as Device;
                    let mut util = Utilization::default();
                    let mut mem = Memory::default();
                    let mut milliwatts: c_uint = 0;
                    let ok_util = util_fn
                        .as_ref()
                        .is_some_and(|f| f(dev, &mut util) == SUCCESS);
                    let mut mem2 = MemoryV2::default();
                    let ok_mem = if mem2_fn
                        .as_ref()
                        .is_some_and(|f| f(dev, &mut mem2) == SUCCESS)
                    {
                        mem.total = mem2.total;
                        mem.used = mem2.used;
                        true
                    } else {
                        mem_fn.as_ref().is_some_and(|f| f(dev, &mut mem) == SUCCESS)
                    };
                    let ok_power = power_fn
                        .as_ref()
                        .is_some_and(|f| f(dev, &mut milliwatts) == SUCCESS);
                    GpuSample {
                        uuid: uuid.clone(),
                        utilization: if ok_util {
                            f64::from(util.gpu) / 100.0
                        } else {
                            0.0
                        },
                        memory_total: if ok_mem { mem.total } else { 0 },
                        memory_used: if ok_mem { mem.used } else { 0 },
                        power_watts: if ok_power {
                            f64::from(milliwatts) / 1000.0
                        } else {
                            0.0
                        },
                    }
                })
                .collect()
        }
    }
}

impl GpuMetrics for Nvml {
    fn render(&self, out: &mut String) {
        render_samples(&self.sample(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_v2_matches_nvmls_struct_layout_and_version() {
        // nvmlMemory_v2_t: unsigned int + four unsigned long long, 8-byte aligned.
        assert_eq!(std::mem::size_of::<MemoryV2>(), 40);
        assert_eq!(MemoryV2::default().version, 0x0200_0028);
    }

    #[test]
    fn renders_triton_families_per_gpu() {
        let s = GpuSample {
            uuid: "GPU-1234".into(),
            utilization: 0.25,
            memory_total: 80,
            memory_used: 8,
            power_watts: 312.5,
        };
        let mut out = String::new();
        render_samples(&[s], &mut out);
        assert!(out.contains("# TYPE nv_gpu_utilization gauge"));
        assert!(out.contains("nv_gpu_utilization{gpu_uuid=\"GPU-1234\"} 0.25"));
        assert!(out.contains("nv_gpu_memory_total_bytes{gpu_uuid=\"GPU-1234\"} 80"));
        assert!(out.contains("nv_gpu_memory_used_bytes{gpu_uuid=\"GPU-1234\"} 8"));
        assert!(out.contains("nv_gpu_power_usage{gpu_uuid=\"GPU-1234\"} 312.5"));
    }

    #[test]
    fn opening_never_panics() {
        // Without a driver this is None; with one, every GPU has a reading.
        if let Some(nvml) = Nvml::open() {
            assert_eq!(nvml.sample().len(), nvml.devices.len());
        }
    }
}
