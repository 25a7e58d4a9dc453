//! `aperture loadgen --shared-memory system`: the request tensors sit in POSIX shared
//! memory objects registered with the server (Triton's system shared-memory extension,
//! as perf_analyzer's `--shared-memory system` does), so each request carries only its
//! JSON header. Inputs are written once; every client's requests read the same regions.

use bytes::Bytes;
use serde_json::json;

use super::client::{HttpClient, WireInput};

/// Region name of input `index` for this process.
pub fn region_name(index: usize) -> String {
    format!("aperture-loadgen-{}-{index}", std::process::id())
}

/// The shared-memory objects of one run, registered with the server; removed again by
/// [`InputRegions::release`] (or at least deleted from /dev/shm when dropped).
pub struct InputRegions {
    files: Vec<(String, std::path::PathBuf)>,
}

impl InputRegions {
    /// Writes each input's bytes into a new object under /dev/shm and registers it.
    pub async fn create(client: &mut HttpClient, inputs: &[WireInput]) -> Result<Self, String> {
        let mut regions = Self { files: Vec::new() };
        for (i, input) in inputs.iter().enumerate() {
            let name = region_name(i);
            let key = format!("/{name}");
            // The object the server opens for this key.
            let path = crate::shm::object_path(&key).map_err(|e| e.to_string())?;
            std::fs::write(&path, &input.raw)
                .map_err(|e| format!("shared memory {}: {e}", path.display()))?;
            regions.files.push((name.clone(), path));
            let body = json!({ "key": key, "offset": 0, "byte_size": input.raw.len() });
            let path = format!("/v2/systemsharedmemory/region/{name}/register");
            let (status, answer) = client
                .send("POST", &path, Bytes::from(body.to_string()), None, true)
                .await?;
            if status != 200 {
                return Err(format!(
                    "registering shared memory '{name}': HTTP {status}: {}",
                    String::from_utf8_lossy(&answer)
                ));
            }
        }
        Ok(regions)
    }

    /// Unregisters the regions (best effort) and deletes the objects.
    pub async fn release(mut self, client: &mut HttpClient) {
        for (name, _) in &self.files {
            let path = format!("/v2/systemsharedmemory/region/{name}/unregister");
            let _ = client.send("POST", &path, Bytes::new(), None, false).await;
        }
        self.remove_files();
    }

    fn remove_files(&mut self) {
        for (_, path) in self.files.drain(..) {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for InputRegions {
    fn drop(&mut self) {
        self.remove_files();
    }
}
