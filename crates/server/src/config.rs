//! `config.toml` of one model folder: what to load and how to schedule it.
//!
//! ```toml
//! architecture = "identity"          # runner factory key
//! weights = "model.safetensors"      # relative to the version folder
//! precision = "fp16"
//! max_batch_size = 8
//! input_size = [3, 64, 64]           # non-batch dims; -1 = variable
//! labels = "labels.txt"
//! version_policy = { latest = 1 }    # or "all", or { specific = [1, 3] }
//! [dynamic_batching]
//! preferred_batch_size = [4, 8]
//! max_queue_delay_microseconds = 500
//! [dynamic_batching.default_queue_policy]
//! max_queue_size = 64
//! [instance_group]
//! count = 1
//! [parameters]                       # free-form, read by the architecture
//! delay_us = 1000
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, ServerError};

fn default_max_batch_size() -> usize {
    8
}

/// Everything `config.toml` may say. Unknown keys are refused so typos surface.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub architecture: String,
    #[serde(default)]
    pub weights: Option<String>,
    #[serde(default)]
    pub precision: Option<String>,
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    #[serde(default)]
    pub input_size: Option<Vec<i64>>,
    #[serde(default)]
    pub labels: Option<String>,
    #[serde(default)]
    pub version_policy: VersionPolicy,
    #[serde(default)]
    pub dynamic_batching: DynamicBatching,
    #[serde(default)]
    pub instance_group: InstanceGroup,
    /// Architecture-specific settings.
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
}

impl ModelConfig {
    /// A config with defaults for `architecture` (used by `--model PATH`).
    pub fn with_architecture(architecture: &str) -> Self {
        Self {
            architecture: architecture.to_string(),
            weights: None,
            precision: None,
            max_batch_size: default_max_batch_size(),
            input_size: None,
            labels: None,
            version_policy: VersionPolicy::default(),
            dynamic_batching: DynamicBatching::default(),
            instance_group: InstanceGroup::default(),
            parameters: BTreeMap::new(),
        }
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let cfg: ModelConfig = toml::from_str(text)
            .map_err(|e| ServerError::invalid(format!("{}: {e}", origin.display())))?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::NotFound(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, path)
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |m: String| Err(ServerError::invalid(format!("{}: {m}", origin.display())));
        if self.max_batch_size == 0 {
            return bad("max_batch_size must be at least 1".into());
        }
        let db = &self.dynamic_batching;
        if let Some(p) = db
            .preferred_batch_size
            .iter()
            .find(|&&p| p == 0 || p > self.max_batch_size)
        {
            return bad(format!(
                "preferred_batch_size {p} must lie in 1..={}",
                self.max_batch_size
            ));
        }
        if db.priority_levels > 0 && db.default_priority_level > db.priority_levels {
            return bad(format!(
                "default_priority_level {} exceeds priority_levels {}",
                db.default_priority_level, db.priority_levels
            ));
        }
        if self.instance_group.count == 0 {
            return bad("instance_group.count must be at least 1".into());
        }
        Ok(())
    }

    /// Integer parameter from `[parameters]`, if present.
    pub fn int_param(&self, key: &str) -> Option<i64> {
        self.parameters.get(key).and_then(|v| v.as_integer())
    }

    /// String parameter from `[parameters]`, if present.
    pub fn str_param(&self, key: &str) -> Option<&str> {
        self.parameters.get(key).and_then(|v| v.as_str())
    }
}

/// Which numeric version folders to serve.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VersionPolicy {
    /// The `n` highest versions.
    Latest(u32),
    All,
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// Picks the versions to load from those found on disk.
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        let mut v = available.to_vec();
        v.sort_unstable();
        match self {
            VersionPolicy::All => v,
            VersionPolicy::Latest(n) => {
                let keep = (*n as usize).min(v.len());
                v.split_off(v.len() - keep)
            }
            VersionPolicy::Specific(want) => v.into_iter().filter(|x| want.contains(x)).collect(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicBatching {
    #[serde(default)]
    pub preferred_batch_size: Vec<usize>,
    #[serde(default)]
    pub max_queue_delay_microseconds: u64,
    #[serde(default)]
    pub preserve_ordering: bool,
    #[serde(default)]
    pub priority_levels: u64,
    #[serde(default)]
    pub default_priority_level: u64,
    #[serde(default)]
    pub default_queue_policy: QueuePolicy,
}

/// Default bound on queued requests: Triton's default is unbounded, we keep memory bounded.
pub const DEFAULT_MAX_QUEUE_SIZE: u32 = 1024;

fn default_max_queue_size() -> u32 {
    DEFAULT_MAX_QUEUE_SIZE
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuePolicy {
    #[serde(default)]
    pub timeout_action: TimeoutAction,
    #[serde(default)]
    pub default_timeout_microseconds: u64,
    #[serde(default)]
    pub allow_timeout_override: bool,
    /// 0 means the server default bound ([`DEFAULT_MAX_QUEUE_SIZE`]).
    #[serde(default = "default_max_queue_size")]
    pub max_queue_size: u32,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        Self {
            timeout_action: TimeoutAction::Reject,
            default_timeout_microseconds: 0,
            allow_timeout_override: false,
            max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum TimeoutAction {
    #[default]
    Reject,
    Delay,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceGroup {
    #[serde(default = "one")]
    pub count: usize,
    /// "cpu", "gpu" or "auto".
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub gpus: Vec<i32>,
}

fn one() -> usize {
    1
}

impl Default for InstanceGroup {
    fn default() -> Self {
        Self {
            count: 1,
            kind: None,
            gpus: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_config() {
        let text = r#"
            architecture = "identity"
            max_batch_size = 16
            input_size = [4]
            version_policy = { latest = 2 }
            [dynamic_batching]
            preferred_batch_size = [4, 8]
            max_queue_delay_microseconds = 100
            [dynamic_batching.default_queue_policy]
            max_queue_size = 3
            timeout_action = "DELAY"
            [parameters]
            delay_us = 5
        "#;
        let cfg = ModelConfig::parse(text, Path::new("m/config.toml")).unwrap();
        assert_eq!(cfg.max_batch_size, 16);
        assert_eq!(cfg.version_policy, VersionPolicy::Latest(2));
        assert_eq!(cfg.dynamic_batching.preferred_batch_size, vec![4, 8]);
        assert_eq!(cfg.dynamic_batching.default_queue_policy.max_queue_size, 3);
        assert_eq!(
            cfg.dynamic_batching.default_queue_policy.timeout_action,
            TimeoutAction::Delay
        );
        assert_eq!(cfg.int_param("delay_us"), Some(5));
    }

    #[test]
    fn refuses_typos_and_bad_values() {
        let err = ModelConfig::parse("architecture = \"x\"\nmax_batch = 3", Path::new("c.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("max_batch"), "{err}");
        let err = ModelConfig::parse(
            "architecture = \"x\"\nmax_batch_size = 4\n[dynamic_batching]\npreferred_batch_size = [8]",
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("preferred_batch_size 8"), "{err}");
    }

    #[test]
    fn version_policies_select() {
        let avail = [3, 1, 2, 10];
        assert_eq!(VersionPolicy::Latest(2).select(&avail), vec![3, 10]);
        assert_eq!(VersionPolicy::All.select(&avail), vec![1, 2, 3, 10]);
        assert_eq!(VersionPolicy::Specific(vec![2, 7]).select(&avail), vec![2]);
        assert_eq!(VersionPolicy::Latest(9).select(&avail).len(), 4);
    }
}
