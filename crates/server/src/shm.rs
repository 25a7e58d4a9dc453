//! Triton's system shared-memory extension: clients on the same host register POSIX
//! shared-memory objects (`/dev/shm/KEY`) as named regions, then name a region, offset
//! and size instead of sending tensor bytes. Inputs are copied from the region straight
//! into tensor storage; outputs are written into it.
//!
//! A region is held by an `Arc`, so a request in flight keeps its mapping alive even if
//! the region is unregistered meanwhile.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Result, ServerError};

/// Where POSIX `shm_open` keeps its objects on Linux.
const SHM_DIR: &str = "/dev/shm";

/// One registered region: `byte_size` bytes at `offset` of the object named `key`.
pub struct ShmRegion {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: usize,
    file: File,
    map: MmapRaw,
}

/// A region as the status endpoints list it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

impl ShmRegion {
    /// Opens `key` read-write and maps `byte_size` bytes at `offset`.
    fn open(name: &str, key: &str, offset: u64, byte_size: u64) -> Result<Self> {
        let path = object_path(key)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| {
                ServerError::invalid(format!(
                    "Unable to open shared memory region: '{key}' ({}: {e})",
                    path.display()
                ))
            })?;
        if byte_size == 0 {
            return Err(ServerError::invalid(format!(
                "shared memory region '{name}': byte_size must be greater than 0"
            )));
        }
        let object_len = object_len(&file, key)?;
        let end = offset.checked_add(byte_size);
        if end.is_none_or(|end| end > object_len) {
            return Err(ServerError::invalid(format!(
                "shared memory region '{name}': offset {offset} + byte_size {byte_size} exceed \
                 the {object_len} bytes of shared memory object '{key}'"
            )));
        }
        let len = usize::try_from(byte_size).map_err(|_| {
            ServerError::invalid(format!("shared memory region '{name}' is too large"))
        })?;
        let map = MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(&file)
            .map_err(|e| {
                ServerError::invalid(format!(
                    "Unable to map shared memory region '{name}' (key '{key}'): {e}"
                ))
            })?;
        Ok(Self {
            name: name.to_string(),
            key: key.to_string(),
            offset,
            byte_size: len,
            file,
            map,
        })
    }

    pub fn status(&self) -> RegionStatus {
        RegionStatus {
            name: self.name.clone(),
            key: self.key.clone(),
            offset: self.offset,
            byte_size: self.byte_size as u64,
        }
    }

    /// Checks that `len` bytes at `offset` lie inside the region (and that the object
    /// still holds them: touching pages of a truncated object would kill the process).
    pub fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.byte_size)
        {
            return Err(ServerError::invalid(format!(
                "Invalid offset + byte size for shared memory region: '{}' \
                 (offset {offset} + byte size {len} > region size {})",
                self.name, self.byte_size
            )));
        }
        let needed = self.offset + self.byte_size as u64;
        let now = object_len(&self.file, &self.key)?;
        if now < needed {
            return Err(ServerError::invalid(format!(
                "shared memory object '{}' of region '{}' was truncated to {now} bytes; \
                 the region needs {needed}",
                self.key, self.name
            )));
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes at `offset` of the region into `dst`.
    pub fn read_into(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check_range(offset, dst.len())?;
        // SAFETY: the range lies inside the mapping (checked above); the mapping lives as
        // long as `self`. Other processes may write the memory concurrently: that is the
        // client's protocol to keep (as with Triton), and bytes are copied, never referenced.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
        Ok(())
    }

    /// Copies `src` into the region at `offset`.
    pub fn write_from(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check_range(offset, src.len())?;
        // SAFETY: as in `read_into`; the mapping is writable (opened read-write, MAP_SHARED).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                src.len(),
            );
        }
        Ok(())
    }
}

/// `/key` -> `/dev/shm/key` (as glibc's `shm_open` does); keys with further slashes
/// or `..` would point elsewhere and are refused.
pub(crate) fn object_path(key: &str) -> Result<PathBuf> {
    let bare = key.trim_start_matches('/');
    if bare.is_empty() || bare.contains('/') || bare == "." || bare == ".." {
        return Err(ServerError::invalid(format!(
            "invalid shared memory key '{key}': expected '/name' of a POSIX shared memory object"
        )));
    }
    Ok(PathBuf::from(SHM_DIR).join(bare))
}

fn object_len(file: &File, key: &str) -> Result<u64> {
    file.metadata().map(|m| m.len()).map_err(|e| {
        ServerError::invalid(format!(
            "Unable to read the size of shared memory object '{key}': {e}"
        ))
    })
}

/// The server's registered regions by name.
pub struct ShmRegistry {
    regions: Mutex<BTreeMap<String, Arc<ShmRegion>>>,
    /// Off (`aperture serve --no-shared-memory`): every registration is refused.
    enabled: bool,
}

impl Default for ShmRegistry {
    fn default() -> Self {
        Self::new(true)
    }
}

impl ShmRegistry {
    pub fn new(enabled: bool) -> Self {
        Self {
            regions: Mutex::new(BTreeMap::new()),
            enabled,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<ShmRegion>>> {
        // The map stays consistent whatever panicked while holding the lock.
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `byte_size` bytes at `offset` of object `key` as region `name`.
    pub fn register(&self, name: &str, key: &str, offset: u64, byte_size: u64) -> Result<()> {
        if !self.enabled {
            return Err(ServerError::invalid(
                "system shared memory is disabled on this server (--no-shared-memory)",
            ));
        }
        if name.is_empty() {
            return Err(ServerError::invalid(
                "shared memory region name must not be empty",
            ));
        }
        if self.lock().contains_key(name) {
            return Err(already_registered(name));
        }
        // Opened outside the lock: the checks touch the file system.
        let region = Arc::new(ShmRegion::open(name, key, offset, byte_size)?);
        let mut map = self.lock();
        if map.contains_key(name) {
            return Err(already_registered(name));
        }
        map.insert(name.to_string(), region);
        tracing::debug!(
            region = name,
            key,
            offset,
            byte_size,
            "registered shared memory"
        );
        Ok(())
    }

    /// Unregisters `name` (an unknown name is not an error, as in Triton).
    pub fn unregister(&self, name: &str) {
        self.lock().remove(name);
    }

    pub fn unregister_all(&self) {
        self.lock().clear();
    }

    /// The region named `name`, for use by one request.
    pub fn get(&self, name: &str) -> Result<Arc<ShmRegion>> {
        self.lock().get(name).cloned().ok_or_else(|| {
            ServerError::invalid(format!(
                "Unable to find system shared memory region: '{name}'"
            ))
        })
    }

    /// Every region, or only `name` (unknown: 404).
    pub fn status(&self, name: Option<&str>) -> Result<Vec<RegionStatus>> {
        let map = self.lock();
        match name {
            None => Ok(map.values().map(|r| r.status()).collect()),
            Some(n) => map.get(n).map(|r| vec![r.status()]).ok_or_else(|| {
                ServerError::NotFound(format!("Unable to find system shared memory region: '{n}'"))
            }),
        }
    }
}

fn already_registered(name: &str) -> ServerError {
    ServerError::invalid(format!("shared memory region '{name}' already in manager"))
}

/// A tensor's place in shared memory, as a request names it.
#[derive(Clone)]
pub struct ShmRef {
    pub region: Arc<ShmRegion>,
    pub byte_size: usize,
    pub offset: usize,
}

impl ShmRef {
    /// Resolves `region` and checks the range against it.
    pub fn resolve(
        registry: &ShmRegistry,
        region: &str,
        byte_size: u64,
        offset: u64,
    ) -> Result<Self> {
        let r = registry.get(region)?;
        let (byte_size, offset) = match (usize::try_from(byte_size), usize::try_from(offset)) {
            (Ok(b), Ok(o)) => (b, o),
            _ => {
                return Err(ServerError::invalid(
                    "shared memory size or offset too large",
                ))
            }
        };
        r.check_range(offset, byte_size)?;
        Ok(Self {
            region: r,
            byte_size,
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared memory object with `len` bytes that is removed on drop.
    struct Object(String);

    impl Object {
        fn new(tag: &str, len: u64) -> Self {
            let key = format!("/aperture-test-{tag}-{}", std::process::id());
            let f = File::create(object_path(&key).unwrap()).unwrap();
            f.set_len(len).unwrap();
            Self(key)
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(object_path(&self.0).unwrap());
        }
    }

    #[test]
    fn register_read_write_and_status() {
        let obj = Object::new("rw", 64);
        let reg = ShmRegistry::default();
        reg.register("r", &obj.0, 16, 32).unwrap();
        let st = reg.status(None).unwrap();
        assert_eq!(
            st,
            vec![RegionStatus {
                name: "r".into(),
                key: obj.0.clone(),
                offset: 16,
                byte_size: 32
            }]
        );
        let r = reg.get("r").unwrap();
        r.write_from(4, &[1, 2, 3]).unwrap();
        // The write landed at object offset 16 + 4.
        let raw = std::fs::read(object_path(&obj.0).unwrap()).unwrap();
        assert_eq!(&raw[20..23], &[1, 2, 3]);
        let mut back = [0u8; 3];
        r.read_into(4, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3]);
        // Duplicates refused, unregister keeps the in-flight Arc usable.
        let dup = reg.register("r", &obj.0, 0, 8).unwrap_err();
        assert!(dup.to_string().contains("already in manager"), "{dup}");
        reg.unregister("r");
        assert!(reg.get("r").is_err());
        assert_eq!(reg.status(Some("r")).unwrap_err().http_status(), 404);
        r.read_into(0, &mut back).unwrap();
    }

    #[test]
    fn bad_ranges_and_keys_are_refused() {
        let obj = Object::new("bad", 64);
        let reg = ShmRegistry::default();
        let e = reg.register("x", &obj.0, 60, 8).unwrap_err();
        assert!(e.to_string().contains("exceed"), "{e}");
        let e = reg
            .register("x", "/aperture-no-such-key", 0, 8)
            .unwrap_err();
        assert!(e.to_string().contains("/aperture-no-such-key"), "{e}");
        assert!(reg.register("x", "/../etc/passwd", 0, 8).is_err());
        reg.register("x", &obj.0, 0, 64).unwrap();
        let r = reg.get("x").unwrap();
        let e = r.read_into(60, &mut [0u8; 8]).unwrap_err();
        assert!(e.to_string().contains("Invalid offset + byte size"), "{e}");
        assert!(r.write_from(usize::MAX, &[0]).is_err());
        assert!(ShmRef::resolve(&reg, "x", 65, 0).is_err());
        assert!(ShmRef::resolve(&reg, "nope", 4, 0).is_err());
        assert!(ShmRef::resolve(&reg, "x", 64, 0).is_ok());
    }
}
